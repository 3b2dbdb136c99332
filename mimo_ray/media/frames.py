"""RGB frames → CLIP-normalised pixels, once, on the encoder's device.

Frames travel from the decoder to the encoder as uint8 ``[..., H, W, 3]`` (a quarter of the float bytes); the vision
encoder normalises them with :func:`normalize_pixels` where its weights live.
"""

from __future__ import annotations

import torch

from mimo_ray.media.pixel_stats import CLIP_MEAN, CLIP_STD

__all__ = ["CLIP_MEAN", "CLIP_STD", "normalize_pixels"]


def normalize_pixels(rgb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 RGB frames → CLIP-normalised channels-first pixels on the same device.

    The arithmetic runs in fp32 (``(rgb / 255 - mean) / std``) and the result is cast to ``dtype`` last.

    Args:
        rgb: uint8 ``[..., H, W, 3]``.
        dtype: dtype of the result (the encoder's compute dtype).

    Returns:
        ``[..., 3, H, W]`` in ``dtype``.

    Raises:
        ValueError: ``rgb`` is not uint8 with 3 trailing channels.
    """
    if rgb.dtype != torch.uint8 or rgb.dim() < 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames [..., H, W, 3], got {rgb.dtype} {tuple(rgb.shape)}")
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32, device=rgb.device)
    std = torch.tensor(CLIP_STD, dtype=torch.float32, device=rgb.device)
    scaled = rgb.to(torch.float32) * (1.0 / 255.0)
    pixels = ((scaled - mean) / std).movedim(-1, -3)  # [..., 3, H, W]
    return pixels.contiguous().to(dtype)
