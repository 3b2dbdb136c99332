"""Fitting a picture of any aspect ratio into the encoder's ``(H, W)`` input: pad, crop or stretch (Pillow).

``pad`` is LLaVA's ``expand2square`` generalised to any target ratio: the short side is padded symmetrically with
the CLIP mean colour (the pixels that normalise to zero), then the padded picture is resized. ``crop`` resizes the
short side to the target and cuts the centre (CLIP's image processor). ``stretch`` resizes without keeping the ratio.
Resizing is bicubic, as in CLIP's processor.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from mimo_ray.media.pixel_stats import CLIP_MEAN

ASPECT_MODES = ("pad", "crop", "stretch")
#: The pad colour: CLIP's mean as uint8 RGB, ``int(x * 255)`` as LLaVA's ``tuple(int(x * 255) for x in
#: image_processor.image_mean)`` gives (122, 116, 104).
PAD_RGB = tuple(int(c * 255) for c in CLIP_MEAN)


def same_aspect(height: int, width: int, size: tuple[int, int]) -> bool:
    """Whether a ``height x width`` picture already has the aspect ratio of ``size = (H, W)`` (pad/crop no-ops)."""
    return height * size[1] == width * size[0]


def fit_picture(rgb: np.ndarray, size: tuple[int, int], aspect: str) -> np.ndarray:
    """uint8 ``[h, w, 3]`` → uint8 ``[H, W, 3]`` by ``aspect`` (see the module docstring).

    Args:
        rgb: one picture at its native size.
        size: target ``(H, W)``.
        aspect: ``pad``, ``crop`` or ``stretch``.

    Returns:
        uint8 ``[H, W, 3]``.

    Raises:
        ValueError: an unknown ``aspect``.
    """
    if aspect not in ASPECT_MODES:
        raise ValueError(f"data.image_aspect must be one of {ASPECT_MODES}, got {aspect!r}")
    out_h, out_w = size
    h, w = rgb.shape[:2]
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if aspect == "pad" and not same_aspect(h, w, size):
        # Smallest canvas of the target ratio holding the picture, picture centred (expand2square for H == W).
        canvas_w, canvas_h = max(w, -(-h * out_w // out_h)), max(h, -(-w * out_h // out_w))
        canvas = Image.new("RGB", (canvas_w, canvas_h), PAD_RGB)
        canvas.paste(image, ((canvas_w - w) // 2, (canvas_h - h) // 2))
        image = canvas
    elif aspect == "crop" and not same_aspect(h, w, size):
        scale = max(out_h / h, out_w / w)
        rw, rh = max(out_w, round(w * scale)), max(out_h, round(h * scale))
        image = image.resize((rw, rh), Image.Resampling.BICUBIC)
        left, top = (rw - out_w) // 2, (rh - out_h) // 2
        image = image.crop((left, top, left + out_w, top + out_h))
    if image.size != (out_w, out_h):
        image = image.resize((out_w, out_h), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)
