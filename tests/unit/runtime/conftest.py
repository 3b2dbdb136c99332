"""Fixtures of the runtime lifecycle tests: a small config (2 micro-batches of 2 samples) and its batches."""

from __future__ import annotations

import pytest

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch


@pytest.fixture(scope="module")
def small_overrides():
    return ["data.micro_batch_size=2", "data.global_batch_size=4", "model.lm.seq_length=64"]


@pytest.fixture(scope="module")
def small_cfg(small_overrides):
    return load_config("tiny", small_overrides)


@pytest.fixture
def microbatches(small_cfg):
    return [random_batch(small_cfg, 2, seed=50 + i) for i in range(2)]
