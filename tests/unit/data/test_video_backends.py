"""decord and PyAV decode the same frames; PyAV alone (no decord, as on aarch64) decodes and names bad files.

Every clip is encoded here with PyAV: H.264 (B-frames, a keyframe every 6 frames), MPEG-4 part 2, VP8 in WebM (no
frame count in the header) and MJPEG in AVI, of textured frames so that any difference in scaling or colour
conversion would show.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from mimo_ray.data.errors import MediaError
from mimo_ray.data.pyav_reader import PyAVVideoReader
from mimo_ray.data.video import decode_video, sample_frame_indices
from mimo_ray.data.video_backend import VIDEO_BACKEND_ENV, decord_available, resolve_video_backend
from mimo_ray.data.video_readers import open_video_reader

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord is not installed (x86_64 only)")

#: name → (codec, container format, encoder options, extra codec-context settings)
CODECS = {
    "h264": ("libx264", "mp4", {"preset": "veryfast", "crf": "16", "threads": "1", "g": "6", "bf": "2"}, {}),
    "mpeg4": ("mpeg4", "mp4", {"qscale": "3"}, {"gop_size": 6, "max_b_frames": 0}),
    "vp8": ("libvpx", "webm", {"threads": "1"}, {"gop_size": 6}),
    "mjpeg": ("mjpeg", "avi", {}, {}),
}


def textured_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Moving gradients plus noise: uint8 ``[T, H, W, 3]``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for t in range(num_frames):
        rgb = np.stack(
            [
                128 + 100 * np.sin(x / 5.0 + t / 2.0),
                128 + 100 * np.cos(y / 4.0 - t / 3.0),
                (3 * x + 2 * y + 9 * t) % 256,
            ],
            axis=-1,
        )
        frames.append(np.clip(rgb + rng.integers(-24, 25, rgb.shape), 0, 255))
    return np.stack(frames).astype(np.uint8)


def encode(path: Path, frames: np.ndarray, codec: str, *, rotation: int = 0, options: dict | None = None) -> Path:
    """Writes ``frames`` with one of :data:`CODECS` (``options`` replace its encoder options)."""
    encoder, fmt, default_options, context = CODECS[codec]
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream(encoder, rate=Fraction(8))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.options = default_options if options is None else options
        for key, value in context.items():
            setattr(stream.codec_context, key, value)
        if rotation:
            stream.set_display_rotation(rotation)
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def sequential_frames(path: Path, width: int, height: int) -> np.ndarray:
    """Every frame in order, decoded from the start without a seek (the reference for random access)."""
    with PyAVVideoReader(str(path), width, height) as reader:
        return reader.get_batch(range(len(reader)))


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    frames = textured_frames(30, 48, 64)
    return {codec: encode(folder / f"clip.{CODECS[codec][1]}", frames, codec) for codec in CODECS} | {
        f"h264-rot{r}": encode(folder / f"rot{r}.mp4", frames[:12], "h264", rotation=r) for r in (90, 180, 270)
    }


# ---------------------------------------------------------------- decord and PyAV agree


@needs_decord
@pytest.mark.parametrize("codec", list(CODECS))
def test_both_backends_count_the_same_frames_and_decode_the_same_bytes(clips, codec: str) -> None:
    path = str(clips[codec])
    for height, width in [(48, 64), (24, 40), (17, 23), (80, 100)]:  # native, down, odd, up
        lengths = []
        for backend in ("decord", "pyav"):
            reader = open_video_reader(path, width, height, backend=backend)
            lengths.append(len(reader))
            reader.close()
        assert lengths == [30, 30]  # the same count, so sample_frame_indices picks the same frames
        for train, seed in [(False, 0), (True, 1), (True, 2)]:
            got = {
                backend: decode_video(
                    path, 8, (height, width), train=train, rng=np.random.default_rng(seed), backend=backend
                )
                for backend in ("decord", "pyav")
            }
            assert got["pyav"].shape == (8, height, width, 3)
            np.testing.assert_array_equal(got["pyav"], got["decord"])


@needs_decord
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_both_backends_turn_rotated_clips_alike(clips, rotation: int) -> None:
    path = str(clips[f"h264-rot{rotation}"])
    decoded = {b: decode_video(path, 4, (40, 30), backend=b) for b in ("decord", "pyav")}
    np.testing.assert_array_equal(decoded["pyav"], decoded["decord"])


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_pyav_shows_a_rotated_clip_turned_as_its_display_matrix_says(clips, rotation: int) -> None:
    path = clips[f"h264-rot{rotation}"]
    with av.open(str(path)) as container:  # the stored pictures, as PyAV decodes them without turning
        stored = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(float)
    height, width = (64, 48) if rotation in (90, 270) else (48, 64)
    turned = sequential_frames(path, width, height).astype(float)
    expected = np.rot90(stored, rotation // 90, axes=(1, 2))  # the display matrix turns counter-clockwise
    assert np.abs(turned - expected).mean() < 1.0  # chroma is upsampled after the turn, hence not exactly 0
    assert np.abs(turned - np.rot90(stored, rotation // 90 + 2, axes=(1, 2))).mean() > 30.0


@needs_decord
def test_both_backends_find_the_frames_of_the_sampled_indices(palette_clip, media) -> None:
    path = palette_clip(16)
    for train, seed in [(False, 0), (True, 3)]:
        expected = sample_frame_indices(16, 5, train=train, rng=np.random.default_rng(seed)).tolist()
        for backend in ("decord", "pyav"):
            frames = decode_video(path, 5, (16, 16), train=train, rng=np.random.default_rng(seed), backend=backend)
            colours = [media.nearest_palette_index(f.reshape(-1, 3).mean(axis=0)) for f in frames.astype(float)]
            assert colours == expected, backend


@needs_decord
def test_widths_decord_cannot_copy_out_come_from_pyav_unchanged(clips) -> None:
    # decord 0.6 fails its buffer copy at widths such as 48 (DECORDArrayCopyFromTo); the PyAV reader stands in.
    path = str(clips["h264"])
    np.testing.assert_array_equal(
        decode_video(path, 6, (32, 48), backend="decord"), decode_video(path, 6, (32, 48), backend="pyav")
    )


# ---------------------------------------------------------------- PyAV's random access


@pytest.mark.parametrize(
    "codec,options",
    [
        ("h264", None),  # closed GOPs, B-frames
        ("h264", {"preset": "veryfast", "threads": "1", "x264-params": "keyint=6:open-gop=1:bframes=2"}),
        ("mpeg4", {"qscale": "3", "bf": "2", "g": "6"}),  # B-frames that refer back across a keyframe
        ("vp8", None),
    ],
)
def test_pyav_random_access_equals_decoding_every_frame_in_order(tmp_path, codec, options) -> None:
    path = encode(tmp_path / f"c.{CODECS[codec][1]}", textured_frames(40, 32, 48, seed=5), codec, options=options)
    reference = sequential_frames(path, 40, 24)
    assert reference.shape == (40, 24, 40, 3)
    with PyAVVideoReader(str(path), 40, 24) as reader:
        assert len(reader) == 40
        assert len(reader._keyframes) >= 6  # the batches below do seek
        for seed in range(4):
            indices = np.sort(np.random.default_rng(seed).choice(40, 7, replace=False)).tolist()
            np.testing.assert_array_equal(reader.get_batch(indices), reference[indices])
        # Any order and repeats, as decord's get_batch allows.
        np.testing.assert_array_equal(reader.get_batch([33, 2, 33, 17, 0]), reference[[33, 2, 33, 17, 0]])
        with pytest.raises(IndexError, match=r"\[0, 40\)"):
            reader.get_batch([40])


def test_bytes_decode_like_the_path(clips) -> None:
    path = clips["h264"]
    from_bytes = decode_video(path.read_bytes(), 5, (24, 32), backend="pyav")
    np.testing.assert_array_equal(from_bytes, decode_video(str(path), 5, (24, 32), backend="pyav"))


# ---------------------------------------------------------------- the switch, and life without decord


@pytest.fixture
def no_decord(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import decord`` fails, as on a machine without its wheel."""
    monkeypatch.setitem(sys.modules, "decord", None)


def test_the_environment_switch_picks_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VIDEO_BACKEND_ENV, "pyav")
    assert resolve_video_backend() == "pyav"
    monkeypatch.setenv(VIDEO_BACKEND_ENV, " PyAV ")
    assert resolve_video_backend() == "pyav"
    monkeypatch.delenv(VIDEO_BACKEND_ENV)
    assert resolve_video_backend() == ("decord" if decord_available() else "pyav")
    assert resolve_video_backend("pyav") == "pyav"  # an explicit argument wins over the variable
    monkeypatch.setenv(VIDEO_BACKEND_ENV, "opencv")
    with pytest.raises(ValueError, match=rf"{VIDEO_BACKEND_ENV}.*'opencv'"):
        resolve_video_backend()


def test_without_decord_auto_is_pyav_and_forcing_decord_says_why(monkeypatch, no_decord) -> None:
    assert not decord_available()
    monkeypatch.setenv(VIDEO_BACKEND_ENV, "auto")
    assert resolve_video_backend() == "pyav"
    monkeypatch.setenv(VIDEO_BACKEND_ENV, "decord")
    with pytest.raises(RuntimeError, match="decord does not import here.*x86_64"):
        resolve_video_backend()


def test_without_decord_videos_decode_and_bad_files_are_named(tmp_path, palette_clip, media, no_decord) -> None:
    path = palette_clip(16)
    frames = decode_video(path, 4, (24, 40))  # auto
    assert frames.dtype == np.uint8 and frames.shape == (4, 24, 40, 3)
    colours = [media.nearest_palette_index(f.reshape(-1, 3).mean(axis=0)) for f in frames.astype(float)]
    assert colours == [2, 6, 10, 14]
    assert np.abs(frames.astype(float) - media.PALETTE[[2, 6, 10, 14]][:, None, None, :]).max() < 12

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # PyAV writes the index (moov) last
    audio_only = tmp_path / "audio_only.wav"
    with av.open(str(audio_only), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    for bad, reason in [(garbage, "cannot decode as video"), (truncated, "cannot decode as video"),
                        (audio_only, "no video stream")]:  # fmt: skip
        with pytest.raises(MediaError, match=rf"{bad.name}: .*{reason}") as err:
            decode_video(bad, 4, (16, 16))
        assert err.value.stage == "decode"
    with pytest.raises(MediaError, match=r"short\.mp4: clip has 3 frames but 8 are needed") as err:
        decode_video(palette_clip(3, name="short.mp4"), 8, (16, 16))
    assert err.value.stage == "frames"
    with pytest.raises(MediaError, match=r"missing\.mp4") as err:
        decode_video(tmp_path / "missing.mp4", 4, (16, 16))
    assert err.value.stage == "open"
