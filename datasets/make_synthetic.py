"""Makes a tiny audio-visual question-answering data set that a small model can learn on CPU.

Each sample is a short H.264 clip of a coloured ball moving across a dark background, with a pure sine tone.
The question asks for the ball's colour and the tone's note; the answer is e.g. ``"red, A"``. About half
the samples carry the tone as the mp4's own audio stream, the others as a separate WAV named by the row's
``audio`` field (at 22.05 or 44.1 kHz, so loaders must resample).

Usage::

    python datasets/make_synthetic.py --out data/syn --num-samples 200 [--seconds 2] [--fps 8] [--size 64x64]
        [--seed 0] [--val-fraction 0.2]

Writes ``train.jsonl``, ``val.jsonl``, ``clips/*.mp4`` and ``audio/*.wav`` under ``--out``. The script only
needs numpy, PyAV and soundfile, so it runs without the ``mimo_ray`` package on the path.

``--output-tasks N`` (opt-in) also writes N generation tasks for the output decoders to ``train_out.jsonl`` /
``val_out.jsonl``: "Draw a red circle." → ``targets/*.png`` (a 64x64 circle) and "Play the note A." →
``targets/*.wav`` (0.5 s at 16 kHz); the gpt answer is the generation tag (``<image_gen>`` / ``<audio_gen>``) and the
row's ``image_out`` / ``audio_out`` field names the target file::

    {"id": "draw-00000", "conversations": [{"from": "human", "value": "Draw a red circle."},
     {"from": "gpt", "value": "<image_gen>"}], "image_out": "targets/draw-00000.png", "colour": "red"}
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import zlib
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np
import soundfile

#: Strongly saturated RGB colours that also differ in brightness (BT.601 luma 51 / 91 / 145 / 218 for blue / red /
#: green / yellow; background < 40), so the answer survives yuv420p chroma subsampling and resizing.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "green": (40, 215, 60),
    "blue": (20, 40, 190),
    "yellow": (245, 235, 60),
}
#: Note name (the answer) → frequency in Hz: C4, F4, A4, E5.
NOTES: dict[str, float] = {"C": 261.63, "F": 349.23, "A": 440.0, "E": 659.26}
QUESTION = "What colour is the ball and which note is playing?"
MUXED_AUDIO_RATES = (16000, 44100)
SEPARATE_AUDIO_RATES = (22050, 44100)

_FADE_SECONDS = 0.01


@dataclass(frozen=True)
class SampleSpec:
    """Everything needed to render one sample; derived deterministically from the seed and its index."""

    sample_id: str
    colour: str
    note: str
    split: str
    muxed_audio: bool
    audio_rate: int


def make_synthetic(
    out_dir: str | os.PathLike[str],
    num_samples: int,
    seconds: float = 2.0,
    fps: int = 8,
    size: tuple[int, int] = (64, 64),
    seed: int = 0,
    val_fraction: float = 0.2,
    output_tasks: int = 0,
) -> dict[str, object]:
    """Writes the synthetic data set.

    Labels are balanced: colours and notes each cycle through their four values, every (colour, note) pair
    occurs once per 16 samples, and the validation split takes a balanced prefix of that cycle.

    Args:
        out_dir: Output folder (created; existing files of the same names are overwritten).
        num_samples: Total samples over both splits.
        seconds: Clip duration.
        fps: Video frame rate.
        size: Frame ``(width, height)`` in pixels; both even (yuv420p).
        seed: Seed for every random choice; equal seeds give equal manifests.
        val_fraction: Fraction of samples (rounded) put in ``val.jsonl``.
        output_tasks: Generation tasks to write besides (see :func:`make_output_tasks`; 0: none).

    Returns:
        ``{"out_dir", "train_manifest", "val_manifest", "num_train", "num_val", "num_muxed_audio",
        "num_separate_audio", "video_codec", "audio_codec"}``.

    Raises:
        ValueError: An argument is out of range (the message names it).
    """
    width, height = _check_args(num_samples, seconds, fps, size, seed, val_fraction)
    video_codec = _first_encoder(("libx264", "mpeg4"))
    audio_codec = _first_encoder(("aac", "libmp3lame", "mp3"))
    out = os.fspath(out_dir)
    os.makedirs(os.path.join(out, "clips"), exist_ok=True)
    os.makedirs(os.path.join(out, "audio"), exist_ok=True)

    rows: dict[str, list[dict[str, object]]] = {"train": [], "val": []}
    num_muxed = 0
    for index, spec in enumerate(plan_samples(num_samples, seed, val_fraction)):
        # A generator per sample: its content depends only on (seed, index), not on the other samples.
        rng = np.random.default_rng([seed, index])
        frames = render_frames(spec.colour, round(seconds * fps), height, width, rng)
        wave = render_tone(NOTES[spec.note], seconds, spec.audio_rate, rng)
        video_rel = f"clips/{spec.sample_id}.mp4"
        row: dict[str, object] = {"id": spec.sample_id, "video": video_rel}
        if spec.muxed_audio:
            _write_mp4(
                os.path.join(out, video_rel), frames, fps, video_codec, (wave, spec.audio_rate, audio_codec)
            )
            num_muxed += 1
        else:
            _write_mp4(os.path.join(out, video_rel), frames, fps, video_codec, None)
            audio_rel = f"audio/{spec.sample_id}.wav"
            soundfile.write(os.path.join(out, audio_rel), wave, spec.audio_rate, subtype="PCM_16")
            row["audio"] = audio_rel
        row["conversations"] = [
            {"from": "human", "value": f"<video>\n<audio>\n{QUESTION}"},
            {"from": "gpt", "value": f"{spec.colour}, {spec.note}"},
        ]
        row["colour"] = spec.colour
        row["note"] = spec.note
        rows[spec.split].append(row)

    paths = {}
    for split, split_rows in rows.items():
        paths[split] = os.path.join(out, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    extra = make_output_tasks(out, output_tasks, seed, val_fraction) if output_tasks > 0 else {}
    return {
        **extra,
        "out_dir": out,
        "train_manifest": paths["train"],
        "val_manifest": paths["val"],
        "num_train": len(rows["train"]),
        "num_val": len(rows["val"]),
        "num_muxed_audio": num_muxed,
        "num_separate_audio": num_samples - num_muxed,
        "video_codec": video_codec,
        "audio_codec": audio_codec,
    }


OUTPUT_IMAGE_SIZE = 64
OUTPUT_AUDIO_RATE = 16000
OUTPUT_AUDIO_SECONDS = 0.5


def write_png(path: str, rgb: np.ndarray) -> None:
    """Writes uint8 ``[H, W, 3]`` as an 8-bit RGB PNG (zlib only)."""
    height, width, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    with open(path, "wb") as f:
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
        f.write(b"\x89PNG\r\n\x1a\n" + body)


def render_circle(colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A filled circle of ``colour`` near the centre of a dark square: uint8 ``[size, size, 3]``."""
    radius = rng.uniform(0.25, 0.35) * size
    cx, cy = size * rng.uniform(0.4, 0.6, size=2)
    yy, xx = np.mgrid[0:size, 0:size]
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = rng.integers(8, 40, size=3).astype(np.uint8)
    image[(xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius**2] = np.array(COLOURS[colour], dtype=np.uint8)
    return image


def make_output_tasks(out: str, num_tasks: int, seed: int, val_fraction: float) -> dict[str, object]:
    """Writes ``num_tasks`` generation tasks (alternating image / audio; colours and notes cycle, so both splits
    are balanced) to ``train_out.jsonl`` / ``val_out.jsonl`` and their targets to ``targets/``.

    Returns:
        ``{"train_out_manifest", "val_out_manifest", "num_train_out", "num_val_out"}``.
    """
    os.makedirs(os.path.join(out, "targets"), exist_ok=True)
    num_val = round(num_tasks * val_fraction)
    rows: dict[str, list[dict[str, object]]] = {"train": [], "val": []}
    colours, notes = list(COLOURS), list(NOTES)
    for index in range(num_tasks):
        rng = np.random.default_rng([seed, 1_000_000 + index])
        split = "val" if index < num_val else "train"
        cycle = index // 2
        if index % 2 == 0:
            colour = colours[cycle % len(colours)]
            rid = f"draw-{index:05d}"
            rel = f"targets/{rid}.png"
            write_png(os.path.join(out, rel), render_circle(colour, OUTPUT_IMAGE_SIZE, rng))
            human, answer, extra = f"Draw a {colour} circle.", "<image_gen>", {"image_out": rel, "colour": colour}
        else:
            note = notes[cycle % len(notes)]
            rid = f"play-{index:05d}"
            rel = f"targets/{rid}.wav"
            wave = render_tone(NOTES[note], OUTPUT_AUDIO_SECONDS, OUTPUT_AUDIO_RATE, rng)
            soundfile.write(os.path.join(out, rel), wave, OUTPUT_AUDIO_RATE, subtype="PCM_16")
            human, answer, extra = f"Play the note {note}.", "<audio_gen>", {"audio_out": rel, "note": note}
        conv = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
        rows[split].append({"id": rid, "conversations": conv, **extra})
    paths = {}
    for split, split_rows in rows.items():
        paths[split] = os.path.join(out, f"{split}_out.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            for row in split_rows:
                f.write(json.dumps(row) + "\n")
    return {
        "train_out_manifest": paths["train"],
        "val_out_manifest": paths["val"],
        "num_train_out": len(rows["train"]),
        "num_val_out": len(rows["val"]),
    }


def plan_samples(num_samples: int, seed: int, val_fraction: float) -> list[SampleSpec]:
    """Assigns labels, split and audio placement to every sample, in id order."""
    rng = np.random.default_rng(seed)
    colours, notes = list(COLOURS), list(NOTES)
    num_val = round(num_samples * val_fraction)
    # Slot j gets colour j % 4 and note (j + j // 4) % 4: both balanced in every aligned run of 4 slots, and
    # all 16 pairs appear in every 16. Shuffling slots over ids hides the pattern; slots < num_val form `val`.
    slots = rng.permutation(num_samples)
    # An independent half of the samples mux their audio, so placement does not correlate with labels.
    muxed = rng.permutation(num_samples) < (num_samples + 1) // 2
    rates = rng.integers(0, 2, size=num_samples)
    specs = []
    for i in range(num_samples):
        j = int(slots[i])
        specs.append(
            SampleSpec(
                sample_id=f"syn-{i:06d}",
                colour=colours[j % 4],
                note=notes[(j + j // 4) % 4],
                split="val" if j < num_val else "train",
                muxed_audio=bool(muxed[i]),
                audio_rate=(MUXED_AUDIO_RATES if muxed[i] else SEPARATE_AUDIO_RATES)[int(rates[i])],
            )
        )
    return specs


def render_frames(
    colour: str, num_frames: int, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws a filled ball of ``colour`` moving in a straight line across a dark background.

    Returns:
        uint8 ``[num_frames, height, width, 3]``.
    """
    radius = rng.uniform(0.16, 0.24) * min(height, width)
    background = rng.integers(8, 40, size=3)
    # Start near one side and end near the opposite side, so the ball crosses the frame.
    x0, x1 = width * rng.uniform(0.2, 0.35), width * rng.uniform(0.65, 0.8)
    if rng.random() < 0.5:
        x0, x1 = x1, x0
    y0, y1 = height * rng.uniform(0.3, 0.7, size=2)
    t = np.linspace(0.0, 1.0, num_frames)[:, None, None]
    cx, cy = x0 + (x1 - x0) * t, y0 + (y1 - y0) * t
    yy, xx = np.mgrid[0:height, 0:width]
    inside = (xx[None] + 0.5 - cx) ** 2 + (yy[None] + 0.5 - cy) ** 2 <= radius**2
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    frames[:] = background.astype(np.uint8)
    frames[inside] = np.array(COLOURS[colour], dtype=np.uint8)
    return frames


def render_tone(frequency: float, seconds: float, rate: int, rng: np.random.Generator) -> np.ndarray:
    """A sine at ``frequency`` with random phase and level, faded in and out to avoid clicks.

    Returns:
        float32 ``[round(seconds * rate)]`` in (-1, 1).
    """
    n = round(seconds * rate)
    t = np.arange(n) / rate
    wave = rng.uniform(0.3, 0.6) * np.sin(2.0 * np.pi * frequency * t + rng.uniform(0.0, 2.0 * np.pi))
    fade = min(n // 2, int(_FADE_SECONDS * rate))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade)
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    return wave.astype(np.float32)


def _write_mp4(
    path: str,
    frames: np.ndarray,
    fps: int,
    video_codec: str,
    audio: tuple[np.ndarray, int, str] | None,
) -> None:
    """Encodes ``frames`` (uint8 ``[T, H, W, 3]``) and optionally ``(wave [N], rate, codec)`` into an mp4."""
    with av.open(path, "w", format="mp4") as container:
        video = container.add_stream(video_codec, rate=Fraction(fps))
        video.width, video.height = frames.shape[2], frames.shape[1]
        video.pix_fmt = "yuv420p"
        video.codec_context.time_base = Fraction(1, fps)
        if video_codec == "libx264":
            # One thread, so the bytes do not depend on the core count. x264's lookahead/mb-tree gave
            # different bytes for the same tiny frames depending on what the process encoded before
            # (measured: 2-4 of 30 clips at 32-64 px); without them the output is reproducible.
            video.options = {
                "preset": "veryfast",
                "crf": "18",
                "threads": "1",
                "x264-params": "rc-lookahead=0:mbtree=0",
            }
        else:
            video.bit_rate = 400_000
        audio_stream = None
        if audio is not None:
            audio_stream = container.add_stream(audio[2], rate=audio[1])
            audio_stream.layout = "mono"
        for index, frame in enumerate(frames):
            picture = av.VideoFrame.from_ndarray(frame, format="rgb24")
            picture.pts = index
            picture.time_base = Fraction(1, fps)
            container.mux(video.encode(picture))
        container.mux(video.encode(None))
        if audio_stream is not None:
            _encode_audio(container, audio_stream, audio[0], audio[1])


def _encode_audio(
    container: av.container.OutputContainer, stream: av.AudioStream, wave: np.ndarray, rate: int
) -> None:
    """Feeds ``wave`` (float32 ``[N]``) to an opened audio stream in encoder-sized frames."""
    frame_size = stream.codec_context.frame_size or 1024
    sample_format = stream.codec_context.format.name
    for start in range(0, wave.size, frame_size):
        chunk = wave[start : start + frame_size]
        if sample_format == "s16":
            data = (np.clip(chunk, -1.0, 1.0) * 32767).astype(np.int16)[None]
        else:
            data = chunk[None]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data), format=sample_format, layout="mono")
        frame.sample_rate = rate
        frame.pts = start
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _first_encoder(names: tuple[str, ...]) -> str:
    """First codec in ``names`` that this FFmpeg build can encode with."""
    for name in names:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # PyAV raises UnknownCodecError (a ValueError) or FFmpegError depending on version
            continue
        return name
    raise RuntimeError(f"none of the encoders {names} is available in PyAV's FFmpeg build")


def _check_args(
    num_samples: int, seconds: float, fps: int, size: tuple[int, int], seed: int, val_fraction: float
) -> tuple[int, int]:
    """Validates the arguments of :func:`make_synthetic`; returns ``(width, height)``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if fps < 1:
        raise ValueError(f"fps must be >= 1, got {fps}")
    if round(seconds * fps) < 1:
        raise ValueError(f"seconds * fps must give at least one frame, got {seconds} * {fps}")
    if len(size) != 2 or any(int(s) != s or s < 2 or s % 2 for s in size):
        raise ValueError(f"size must be (width, height) with even integers >= 2 (yuv420p), got {size!r}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    return int(size[0]), int(size[1])


def _parse_size(text: str) -> tuple[int, int]:
    """Parses ``WxH`` for argparse."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"--size must look like 64x64 (WIDTHxHEIGHT), got {text!r}")
    return int(parts[0]), int(parts[1])


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; prints the summary as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-samples", type=int, required=True, help="samples over both splits")
    parser.add_argument("--seconds", type=float, default=2.0, help="clip duration (default 2.0)")
    parser.add_argument("--fps", type=int, default=8, help="video frame rate (default 8)")
    parser.add_argument(
        "--size", type=_parse_size, default=(64, 64), help="frame WIDTHxHEIGHT (default 64x64)"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--val-fraction", type=float, default=0.2, help="fraction put in val.jsonl (default 0.2)"
    )
    parser.add_argument(
        "--output-tasks", type=int, default=0, help="also write N draw/play generation tasks (default 0)"
    )
    args = parser.parse_args(argv)
    try:
        summary = make_synthetic(
            args.out, args.num_samples, args.seconds, args.fps, args.size, args.seed, args.val_fraction,
            args.output_tasks,
        )
    except ValueError as exc:
        parser.error(
            str(exc).replace("num_samples", "--num-samples").replace("val_fraction", "--val-fraction")
        )
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
