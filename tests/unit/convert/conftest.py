"""Tiny random Hugging Face models, saved once per session (see tests/hf_tiny.py)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """``{name: directory}`` of every tiny HF model of :func:`tests.hf_tiny.build_hf_dirs`."""
    from tests.hf_tiny import build_hf_dirs

    return build_hf_dirs(tmp_path_factory.mktemp("hf"))
