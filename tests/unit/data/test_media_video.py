"""Frame index sampling and video/image decoding on real H.264 files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from mimo_ray.data.errors import MediaError
from mimo_ray.data.video import decode_image, decode_video, sample_frame_indices
from mimo_ray.media.frames import CLIP_MEAN, CLIP_STD


def to_rgb(frames: np.ndarray) -> np.ndarray:
    """Decoded uint8 ``[T, H, W, 3]`` frames as float RGB in 0..255."""
    return frames.astype(np.float64)


def frame_colour_indices(frames: np.ndarray, media) -> list[int]:
    """Palette index of each decoded frame's mean colour."""
    return [media.nearest_palette_index(rgb.reshape(-1, 3).mean(axis=0)) for rgb in to_rgb(frames)]


# ---------------------------------------------------------------- sample_frame_indices


def test_eval_indices_are_segment_centres() -> None:
    np.testing.assert_array_equal(sample_frame_indices(16, 4, train=False, rng=None), [2, 6, 10, 14])
    np.testing.assert_array_equal(sample_frame_indices(8, 8, train=False, rng=None), np.arange(8))
    np.testing.assert_array_equal(sample_frame_indices(10, 3, train=False, rng=None), [1, 5, 8])


@pytest.mark.parametrize("num_total,num_frames", [(8, 8), (9, 8), (13, 5), (100, 8), (1000, 32)])
def test_indices_are_sorted_distinct_and_in_range(num_total: int, num_frames: int) -> None:
    for train in (False, True):
        for seed in range(5):
            idx = sample_frame_indices(num_total, num_frames, train=train, rng=np.random.default_rng(seed))
            assert idx.dtype == np.int64 and idx.shape == (num_frames,)
            assert np.all(np.diff(idx) > 0)
            assert idx[0] >= 0 and idx[-1] < num_total


def test_train_jitter_is_deterministic_per_seed_and_varies_across_seeds() -> None:
    draw = [sample_frame_indices(100, 8, train=True, rng=np.random.default_rng(s)) for s in (0, 0, 1)]
    np.testing.assert_array_equal(draw[0], draw[1])
    assert not np.array_equal(draw[0], draw[2])
    # Each draw stays inside its own segment of 100 / 8 frames.
    segment = np.floor(draw[2] / 12.5)
    np.testing.assert_array_equal(segment, np.arange(8))


def test_too_few_frames_is_an_error_naming_both_counts() -> None:
    with pytest.raises(ValueError, match="clip has 5 frames but 8 are needed"):
        sample_frame_indices(5, 8, train=False, rng=None)
    with pytest.raises(ValueError, match="num_frames"):
        sample_frame_indices(5, 0, train=False, rng=None)


# ---------------------------------------------------------------- decode_video


def test_decoded_frames_show_the_colours_of_the_sampled_indices(palette_clip, media) -> None:
    path = palette_clip(16)
    frames = decode_video(path, 4, (24, 40))
    assert frames.dtype == np.uint8 and frames.shape == (4, 24, 40, 3)
    assert frame_colour_indices(frames, media) == [2, 6, 10, 14]
    # Solid frames decode to within a few levels of the source colour despite yuv420p.
    assert np.abs(to_rgb(frames) - media.PALETTE[[2, 6, 10, 14]][:, None, None, :]).max() < 12


def test_train_decoding_follows_the_seeded_jitter(palette_clip, media) -> None:
    path = palette_clip(16)
    for seed in (3, 4):
        expected = sample_frame_indices(16, 5, train=True, rng=np.random.default_rng(seed))
        frames = decode_video(path, 5, (16, 16), train=True, rng=np.random.default_rng(seed))
        assert frame_colour_indices(frames, media) == expected.tolist()


def test_decoding_bytes_equals_decoding_the_path(palette_clip) -> None:
    path = palette_clip(12)
    np.testing.assert_array_equal(
        decode_video(path.read_bytes(), 6, (16, 16)), decode_video(str(path), 6, (16, 16))
    )


def test_clip_normalisation_constants() -> None:
    np.testing.assert_allclose(CLIP_MEAN, [0.48145466, 0.4578275, 0.40821073])
    np.testing.assert_allclose(CLIP_STD, [0.26862954, 0.26130258, 0.27577711])


def test_video_errors_name_stage_and_file(tmp_path, palette_clip) -> None:
    missing = tmp_path / "missing.mp4"
    with pytest.raises(MediaError, match=r"missing\.mp4") as err:
        decode_video(missing, 4, (16, 16))
    assert err.value.stage == "open"

    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4") as err:
        decode_video(empty, 4, (16, 16))
    assert err.value.stage == "open"
    with pytest.raises(MediaError) as err:
        decode_video(b"", 4, (16, 16))
    assert err.value.stage == "open"

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=r"garbage\.mp4") as err:
        decode_video(garbage, 4, (16, 16))
    assert err.value.stage == "decode"

    short = palette_clip(3, name="short.mp4")
    with pytest.raises(MediaError, match=r"short\.mp4: clip has 3 frames but 8 are needed") as err:
        decode_video(short, 8, (16, 16))
    assert err.value.stage == "frames"


def test_media_error_survives_pickling() -> None:
    err = pickle.loads(pickle.dumps(MediaError("truncated", "a.wav: short")))
    assert isinstance(err, ValueError) and err.stage == "truncated" and err.message == "a.wav: short"
    assert str(err) == "[truncated] a.wav: short"
    with pytest.raises(ValueError, match="stage"):
        MediaError("bogus", "x")


# ---------------------------------------------------------------- decode_image


def test_decode_image_resizes_to_rgb(png_file, tmp_path) -> None:
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, :20] = (255, 0, 0)
    rgb[:, 20:] = (0, 0, 255)
    image = decode_image(png_file(rgb), (10, 8))
    assert image.dtype == np.uint8 and image.shape == (1, 10, 8, 3)
    decoded = to_rgb(image)[0]
    np.testing.assert_allclose(decoded[:, :3], np.broadcast_to([255, 0, 0], (10, 3, 3)), atol=2)
    np.testing.assert_allclose(decoded[:, 5:], np.broadcast_to([0, 0, 255], (10, 3, 3)), atol=2)

    with pytest.raises(MediaError) as err:
        decode_image(tmp_path / "nope.png", (8, 8))
    assert err.value.stage == "open"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all" * 10)
    with pytest.raises(MediaError, match=r"bad\.png") as err:
        decode_image(bad, (8, 8))
    assert err.value.stage == "decode"
