"""PNG writing through Pillow: lossless, byte-compatible with the former zlib writer's decoded pixels."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimo_ray.media.files import read_png, write_png


def former_write_png(path: Path, rgb: np.ndarray) -> None:
    """The hand-written writer Pillow replaced (8-bit RGB, filter 0, one IDAT chunk)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y]).tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_pillow_png_decodes_to_the_same_pixels_as_the_former_writer(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)  # non-square, odd sizes
    write_png(tmp_path / "new.png", rgb)
    former_write_png(tmp_path / "old.png", rgb)
    # Tolerance 0: PNG is lossless, both files decode to exactly the input (PyAV reader and Pillow reader).
    np.testing.assert_array_equal(read_png(str(tmp_path / "new.png")), rgb)
    np.testing.assert_array_equal(read_png(str(tmp_path / "new.png")), read_png(str(tmp_path / "old.png")))
    with Image.open(tmp_path / "new.png") as image:
        assert image.mode == "RGB" and image.size == (53, 37)
        np.testing.assert_array_equal(np.asarray(image), rgb)


def test_write_png_rejects_non_rgb_uint8(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\], got float32 \[4, 4, 3\]"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    assert not (tmp_path / "x.png").exists()
