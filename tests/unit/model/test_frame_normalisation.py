"""Frames reach the vision encoder as decoded uint8 RGB and are CLIP-normalised once, there (issue 15 item 5)."""

import numpy as np
import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.media.frames import CLIP_MEAN, CLIP_STD, normalize_pixels
from mimo_ray.model import build_fused_model, encoder_name


def test_normalize_pixels_is_clip_normalisation_channels_first() -> None:
    rgb = torch.randint(0, 256, (2, 3, 5, 7, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = normalize_pixels(rgb)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 3, 5, 7)
    expected = (rgb.numpy().astype(np.float64) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out.numpy(), np.moveaxis(expected, -1, -3), rtol=0, atol=1e-6)
    # The extremes of the range: black and white in every channel.
    ends = normalize_pixels(torch.tensor([[[0, 0, 0], [255, 255, 255]]], dtype=torch.uint8))
    np.testing.assert_allclose(ends[:, 0, 0], -np.array(CLIP_MEAN) / np.array(CLIP_STD), atol=1e-6)
    np.testing.assert_allclose(ends[:, 0, 1], (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-6)
    assert normalize_pixels(rgb, torch.bfloat16).dtype == torch.bfloat16


def test_normalize_pixels_rejects_floats_and_non_rgb() -> None:
    with pytest.raises(ValueError, match=r"expected uint8 RGB frames \[\.\.\., H, W, 3\], got torch.float32"):
        normalize_pixels(torch.zeros(2, 4, 4, 3))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(2, 3, 4, 4\)"):
        normalize_pixels(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize("modality", ["video", "images"])
def test_encoder_on_uint8_frames_equals_encoder_on_normalised_floats(megatron_world, modality) -> None:
    cfg = load_config("tiny", [f"model.modalities=[{modality}]"])
    model = build_fused_model(cfg).eval()
    lead = (2, cfg.model.vision.num_frames) if modality == "video" else (2,)
    size = cfg.model.vision.img_size
    rgb = torch.randint(0, 256, (*lead, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    encoder = model.modality_submodules[modality]
    name = encoder_name(cfg.model, modality)
    with torch.no_grad():
        from_uint8 = encoder({name: {"pixel_values": rgb}})
        from_float = encoder({name: {"pixel_values": normalize_pixels(rgb)}})
    assert from_uint8.shape == from_float.shape
    torch.testing.assert_close(from_uint8, from_float, rtol=0, atol=0)
