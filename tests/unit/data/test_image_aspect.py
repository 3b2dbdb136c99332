"""data.image_aspect = pad | crop | stretch on non-square images and video frames (real PNG / H.264 files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mimo_ray.config import DataConfig
from mimo_ray.data.video import decode_image, decode_video
from mimo_ray.media.geometry import PAD_RGB, fit_picture

RED, BLUE = (230, 20, 20), (20, 20, 230)


def halves(height: int, width: int) -> np.ndarray:
    """Left half red, right half blue (a wide picture) — or top red, bottom blue when tall."""
    rgb = np.empty((height, width, 3), np.uint8)
    if width >= height:
        rgb[:, : width // 2], rgb[:, width // 2 :] = RED, BLUE
    else:
        rgb[: height // 2], rgb[height // 2 :] = RED, BLUE
    return rgb


def assert_wide_layout(out: np.ndarray, aspect: str, tol: float) -> None:
    """Colour regions of a 40x80 red|blue picture fitted to 32x32."""
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    o = out.astype(np.float64)
    if aspect == "pad":  # 80 wide → canvas 80x80, picture in rows 20..59 → rows 8..23 after the 2.5x shrink
        np.testing.assert_allclose(o[:6].reshape(-1, 3).mean(0), PAD_RGB, atol=tol)
        np.testing.assert_allclose(o[26:].reshape(-1, 3).mean(0), PAD_RGB, atol=tol)
        np.testing.assert_allclose(o[10:22, 2:14].reshape(-1, 3).mean(0), RED, atol=tol)
        np.testing.assert_allclose(o[10:22, 18:30].reshape(-1, 3).mean(0), BLUE, atol=tol)
    else:  # crop keeps the centre 40x40: red | blue halves over all rows; stretch: the same halves, all rows
        np.testing.assert_allclose(o[:, 2:14].reshape(-1, 3).mean(0), RED, atol=tol)
        np.testing.assert_allclose(o[:, 18:30].reshape(-1, 3).mean(0), BLUE, atol=tol)


def test_pad_colour_is_llava_clip_mean() -> None:
    # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean), CLIP mean (0.48145466, 0.4578275, 0.40821073)
    assert PAD_RGB == (122, 116, 104)


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
def test_fit_picture_on_a_wide_picture(aspect: str) -> None:
    assert_wide_layout(fit_picture(halves(40, 80), (32, 32), aspect), aspect, tol=1.0)


def test_pad_and_crop_keep_proportions_that_stretch_does_not() -> None:
    # A 100x20 (tall) picture with a 20x20 green square at its top, fitted to 25x25 (a quarter of its height): pad
    # keeps the square 5x5, stretch makes it 5 tall and 25 wide, crop keeps the centre (no green).
    rgb = np.zeros((100, 20, 3), np.uint8)
    rgb[:20] = (0, 255, 0)
    green = {a: (fit_picture(rgb, (25, 25), a)[..., 1] > 128) for a in ("pad", "crop", "stretch")}
    rows, cols = np.nonzero(green["pad"])
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (5, 5)  # square stays square
    assert cols.min() == 10  # centred horizontally: padding (100 - 20) / 2 = 40 px → 10 px each side
    rows, cols = np.nonzero(green["stretch"])
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (5, 25)
    assert not green["crop"].any()  # the centre 20x20 of the tall picture holds no green


def test_square_pictures_are_untouched_by_the_mode() -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    outs = [fit_picture(rgb, (32, 32), a) for a in ("pad", "crop", "stretch")]
    np.testing.assert_array_equal(outs[0], outs[2])
    np.testing.assert_array_equal(outs[1], outs[2])


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
def test_decode_image_on_a_non_square_png(aspect: str, png_file) -> None:
    out = decode_image(png_file(halves(40, 80)), (32, 32), aspect)
    assert out.shape == (1, 32, 32, 3)
    assert_wide_layout(out[0], aspect, tol=3.0)


@pytest.mark.parametrize("aspect", ["pad", "crop", "stretch"])
def test_decode_video_on_non_square_frames(aspect: str, tmp_path: Path, media) -> None:
    path = media.write_mp4(tmp_path / "wide.mp4", np.stack([halves(40, 80)] * 8))
    frames = decode_video(path, 4, (32, 32), aspect=aspect)
    assert frames.shape == (4, 32, 32, 3)
    for frame in frames:
        assert_wide_layout(frame, aspect, tol=12.0)  # H.264 at crf 12 in yuv420p: colours within ±12


def test_square_clips_decode_bit_identically_in_every_mode(palette_clip) -> None:
    path = palette_clip(8)
    ref = decode_video(path, 4, (16, 16), aspect="stretch")
    for aspect in ("pad", "crop"):
        np.testing.assert_array_equal(decode_video(path, 4, (16, 16), aspect=aspect), ref)


def test_image_aspect_config_default_and_validation() -> None:
    assert DataConfig().image_aspect == "pad"
    with pytest.raises(ValueError, match="data.image_aspect"):
        DataConfig(image_aspect="letterbox")
    with pytest.raises(ValueError, match="aspect must be one of"):
        fit_picture(halves(4, 8), (4, 4), "letterbox")
