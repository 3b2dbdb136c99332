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
        from mimo_ray.config import MODALITIES
        from mimo_ray.model.spec import input_shape

        a, v = cfg.model.audio, cfg.model.vision
        mods = tuple(m for m in cfg.model.modalities if m in MODALITIES)  # user modalities: decode_hooks
        return cls(
            modalities=mods,
            num_frames=v.num_frames,
            img_size=v.img_size,
            audio_backbone=a.backbone_type,
            sample_rate=a.sample_rate,
            clip_samples=a.num_samples,
            n_mels=a.n_mels,
            n_fft=a.n_fft,
            hop_length=a.hop_length,
            fbank_bins=a.fbank_bins,
            shapes=tuple((m, tuple(input_shape(cfg, m))) for m in mods),
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
    """Decode a sample with one item of every modality of ``spec`` (the audio from ``audio``, else from the video).

    Args:
        request: ``{"video", "audio", "image"}`` absolute paths (or ``None``), ``"train"``, ``"seed"``.
        spec: shapes and feature settings.

    Returns:
        ``{modality: array}`` per item (no item dim), see :func:`decode_items`.
    """
    req = dict(request)
    if "audio" in spec.modalities and not req.get("audio"):
        req["audio_from"] = "video"
    return {mod: arr[0] for mod, arr in decode_items(req, spec).items()}


def decode_request(request: dict[str, Any], spec: MediaSpec) -> dict[str, np.ndarray]:
    """What the isolated decoder runs: :func:`decode_items` for a pipeline request (``"items": True``), else
    :func:`decode_media`.
    """
    return decode_items(request, spec) if request.get("items") else decode_media(request, spec)


def decode_items(request: dict[str, Any], spec: MediaSpec) -> dict[str, np.ndarray]:
    """Decode one sample: every media item it carries, zero or more per modality.

    Args:
        request: ``{"video", "audio", "image"}``: an absolute path, a list of them, or ``None``; ``"audio_from"``
            (``"video"``: each video's own audio stream stands for one audio item), ``"train"`` (jitter) and
            ``"seed"`` (``[seed, epoch, row]``). An audio item is cut short (``truncated``) only relative to the
            length its own file declares, then padded with zeros or cropped to ``spec.clip_samples``.
        spec: shapes and feature settings.

    Returns:
        ``{modality: [k, ...]}`` for every modality of ``spec.modalities`` with ``k >= 1`` items, in its transport
        layout (:func:`transport_layout`): uint8 RGB ``[k, T, H, W, 3]`` video and ``[k, H, W, 3]`` images, float32
        audio ``[k, bins, frames]``; a modality without items is absent.

    Raises:
        MediaError: with the failing stage (``open``, ``decode``, ``frames``, ``audio``, ``truncated``).
    """
    train = bool(request.get("train"))
    seed = [int(s) for s in request.get("seed", [0])]
    out: dict[str, list[np.ndarray]] = {}
    size = (spec.img_size, spec.img_size)

    def items(key: str) -> list[str]:
        value = request.get(key)
        return [] if not value else list(value) if isinstance(value, list | tuple) else [value]

    def item_rng(index: int, item: int) -> np.random.Generator:
        # Item 0 keeps the seed a one-item sample always had, so single-item data decode as before.
        return np.random.default_rng([*seed, index] if item == 0 else [*seed, index, item])

    if "video" in spec.modalities:
        out["video"] = [
            decode_video(p, spec.num_frames, size, train=train, rng=item_rng(0, i), aspect=spec.image_aspect)
            for i, p in enumerate(items("video"))
        ]
    if "images" in spec.modalities:
        out["images"] = [decode_image(p, size, spec.image_aspect)[0] for p in items("image")]
    if "audio" in spec.modalities:
        from_video = request.get("audio_from") == "video"
        sources = items("video") if from_video else items("audio")
        waves = []
        for i, path in enumerate(sources):
            # Judged against its own header only: a track shorter or longer than the video is padded or cropped.
            wave = load_audio(path, target_sr=spec.sample_rate, from_video=from_video)
            waves.append(audio_features(crop_or_pad(wave, spec.clip_samples, train=train, rng=item_rng(1, i)), spec))
        out["audio"] = waves
    arrays = {}
    for mod, found in out.items():
        if not found:
            continue
        dtype, shape = transport_layout(mod, spec.shape(mod))
        for arr in found:
            if tuple(arr.shape) != shape:
                raise ValueError(f"{mod} decoded to shape {tuple(arr.shape)}, the encoder takes {shape}")
        arrays[mod] = np.ascontiguousarray(np.stack(found), dtype=dtype)
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
    out = []
    for key in ("video", "audio", "image"):
        value = request.get(key)
        out += [os.fspath(v) for v in (value if isinstance(value, list | tuple) else [value]) if v]
    return out
