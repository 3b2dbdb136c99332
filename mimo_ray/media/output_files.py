"""Where a row's generated image / audio is written: a collision-free name inside the chosen folder, never outside."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from mimo_ray.media.files import write_png, write_wav

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_STEM = 60  # characters of the readable part of a file name


def output_file_name(row_id: str, suffix: str) -> str:
    """A file name for a row's output that cannot collide with another id's or leave its folder.

    The id's ASCII letters, digits, ``-`` and ``_`` are kept (other runs of characters become one ``_``, at most
    :data:`MAX_STEM` characters), followed by the first 12 hex digits of the SHA-256 of the full id: ``a.1`` →
    ``a_1-<hash>.png``; ``../evil`` → ``_evil-<hash>.png``. No separator, dot or leading dot survives.
    """
    ascii_id = unicodedata.normalize("NFKD", row_id).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("_", ascii_id)[:MAX_STEM] or "row"
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}{suffix}"


def write_output(name: str, value: np.ndarray, folder: Path, row_id: str, spec: Any) -> Path:
    """Write one decoded output under ``folder``: image ``[3, S, S]`` in [0, 1] → PNG; waveform ``[L]`` → WAV.

    Returns:
        The file, named by :func:`output_file_name`.

    Raises:
        ValueError: the name would resolve outside ``folder`` (an invariant; names hold no separators).
    """
    suffix = ".png" if name == "image_out" else ".wav"
    path = Path(folder) / output_file_name(row_id, suffix)
    if path.resolve().parent != Path(folder).resolve():
        raise ValueError(f"output file for row {row_id!r} would be written outside {str(folder)!r}: {path}")
    if name == "image_out":
        write_png(path, np.round(np.clip(value, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))
    else:
        write_wav(path, np.asarray(value, dtype=np.float32), spec.sample_rate)
    return path
