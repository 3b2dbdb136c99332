"""``mimo_ray.import_pretrained``: local Hugging Face directories → a new run directory (what
``jobs/convert.py import`` does), ready for :func:`mimo_ray.generate` or :class:`mimo_ray.Trainer`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path


def import_pretrained(
    output_dir: str | os.PathLike,
    *,
    lm: str | os.PathLike | None = None,
    vision: str | os.PathLike | None = None,
    audio: str | os.PathLike | None = None,
    preset: str = "tiny",
    overrides: Sequence[str] | None = None,
) -> Path:
    """Import a LLaMA-family / Qwen2 LM, a CLIP vision tower and/or a Whisper encoder (local directories, no
    downloads) into ``output_dir``: its ``config.yaml`` (shapes from each ``config.json``; the modalities are those
    given: an LM alone is a text-only model), tokenizer and ``checkpoints/step_0000000``.

    Args:
        output_dir: the new run directory (must not hold checkpoints).
        lm: a LLaMA-family / Qwen2 directory (``config.json``, weights, ``tokenizer.json``).
        vision: a ``CLIPVisionModel`` / ``CLIPModel`` directory.
        audio: a ``WhisperModel`` / ``WhisperForConditionalGeneration`` directory.
        preset: the preset the rest of the config comes from.
        overrides: ``"section.field=value"`` overrides (e.g. ``parallel.lm_tp=2``).

    Returns:
        ``output_dir`` as a path.

    Raises:
        ValueError: nothing to import, an unsupported or inconsistent directory (naming the file and key).
    """
    from mimo_ray.convert.importer import import_run

    import_run(
        str(lm) if lm else None, str(vision) if vision else None, str(audio) if audio else None,
        str(output_dir), preset, list(overrides or []),
    )
    return Path(output_dir)
