"""One sample's media → encoder inputs: ``num_frames`` uint8 RGB frames, a log-mel (Whisper) or fbank (BEATs) of the
clip's audio, an uint8 RGB image. Pure numpy on top of :mod:`mimo_ray.data.video` / :mod:`mimo_ray.data.audio`; runs
inside the isolated decoder process (:mod:`mimo_ray.data.isolation`), in the benchmarks and in tests.

Training jitter (frame choice inside each segment, audio crop offset) is drawn from a generator seeded by
``(seed, epoch, row)``, so it never depends on which worker decoded the sample or when.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mimo_ray.data.audio import crop_or_pad, fbank, load_audio, log_mel
from mimo_ray.data.video import decode_image, decode_video

#: Frames travel as decoded, uint8 ``[..., H, W, 3]`` (4x fewer bytes than normalised floats), from the decoder
#: to the encoder's device, where the vision encoder normalises them once
#: (:func:`mimo_ray.media.frames.normalize_pixels`).
FRAME_MODALITIES = ("video", "images")


@dataclass(frozen=True)
class MediaSpec:
    """What to decode and the exact per-sample shapes the encoders take (from ``model.spec.input_shape``)."""

    modalities: tuple[str, ...]
    num_frames: int
    img_size: int
    audio_backbone: str
    sample_rate: int
    clip_samples: int
    n_mels: int
    n_fft: int
    hop_length: int
    fbank_bins: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    image_aspect: str = "pad"

    @classmethod
    def from_config(cls, cfg: Any) -> MediaSpec:
        from mimo_ray.model.spec import input_shape

        a, v = cfg.model.audio, cfg.model.vision
        return cls(
            modalities=tuple(cfg.model.modalities),
            num_frames=v.num_frames,
            img_size=v.img_size,
            audio_backbone=a.backbone_type,
            sample_rate=a.sample_rate,
            clip_samples=a.num_samples,
            n_mels=a.n_mels,
            n_fft=a.n_fft,
            hop_length=a.hop_length,
            fbank_bins=a.fbank_bins,
            shapes=tuple((m, tuple(input_shape(cfg, m))) for m in cfg.model.modalities),
            image_aspect=cfg.data.image_aspect,
        )

    def shape(self, modality: str) -> tuple[int, ...]:
        return dict(self.shapes)[modality]


def audio_features(wave: np.ndarray, spec: MediaSpec) -> np.ndarray:
    """Mono float32 at ``spec.sample_rate`` (already ``clip_samples`` long) → ``[bins, frames]`` float32."""
    if spec.audio_backbone == "whisper":
        return log_mel(wave, n_mels=spec.n_mels, n_fft=spec.n_fft, hop=spec.hop_length, sr=spec.sample_rate)
    return fbank(wave, n_mels=spec.fbank_bins, sr=spec.sample_rate)


def decode_media(request: dict[str, Any], spec: MediaSpec) -> dict[str, np.ndarray]:
    """Decode one sample.

    Args:
        request: ``{"video", "audio", "image"}`` absolute paths (or ``None``), ``"train"`` (jitter) and ``"seed"``
            (``[seed, epoch, row]``). Audio comes from ``audio`` or, when that is ``None``, the video's own stream;
            either way it is cut short (``truncated``) only relative to the length its own file declares, then
            padded with zeros or cropped to ``spec.clip_samples`` whatever the video's duration.
        spec: shapes and feature settings.

    Returns:
        ``{modality: array}`` for every modality in ``spec.modalities``, in its transport layout
        (:func:`transport_layout`): uint8 RGB ``[T, H, W, 3]`` video and ``[H, W, 3]`` images, float32 audio.

    Raises:
        MediaError: with the failing stage (``open``, ``decode``, ``frames``, ``audio``, ``truncated``).
    """
    train = bool(request.get("train"))
    seed = [int(s) for s in request.get("seed", [0])]
    out: dict[str, np.ndarray] = {}
    size = (spec.img_size, spec.img_size)
    if "video" in spec.modalities:
        rng = np.random.default_rng([*seed, 0])
        out["video"] = decode_video(
            request["video"], spec.num_frames, size, train=train, rng=rng, aspect=spec.image_aspect
        )
    if "images" in spec.modalities:
        out["images"] = decode_image(request["image"], size, spec.image_aspect)[0]
    if "audio" in spec.modalities:
        rng = np.random.default_rng([*seed, 1])
        if request.get("audio"):
            # Judged against its own header only: a track shorter or longer than the video is padded or cropped.
            wave = load_audio(request["audio"], target_sr=spec.sample_rate)
        else:
            wave = load_audio(request["video"], target_sr=spec.sample_rate, from_video=True)
        wave = crop_or_pad(wave, spec.clip_samples, train=train, rng=rng)
        out["audio"] = audio_features(wave, spec)
    arrays = {}
    for mod, arr in out.items():
        dtype, shape = transport_layout(mod, spec.shape(mod))
        if tuple(arr.shape) != shape:
            raise ValueError(f"{mod} decoded to shape {tuple(arr.shape)}, the encoder takes {shape}")
        arrays[mod] = np.ascontiguousarray(arr, dtype=dtype)
    return arrays


def transport_layout(modality: str, shape: tuple[int, ...]) -> tuple[type, tuple[int, ...]]:
    """``(dtype, per-sample shape)`` a modality travels as, given its model input ``shape``."""
    if modality == "video":
        frames, _, height, width = shape
        return np.uint8, (frames, height, width, 3)
    if modality == "images":
        _, height, width = shape
        return np.uint8, (height, width, 3)
    return np.float32, tuple(shape)


def from_transport(modality: str, batch: np.ndarray) -> np.ndarray:
    """Transport arrays ``[B, *transport shape]`` (e.g. read-only views of Arrow buffers) → an owned, writable array
    the model takes as is: uint8 frames (normalised by the vision encoder on its device), float32 audio.
    """
    dtype = np.uint8 if modality in FRAME_MODALITIES else np.float32
    return np.array(batch, dtype=dtype)


def request_paths(request: dict[str, Any]) -> list[str]:
    """The media files a request reads (for fault injection and messages)."""
    return [os.fspath(request[k]) for k in ("video", "audio", "image") if request.get(k)]
