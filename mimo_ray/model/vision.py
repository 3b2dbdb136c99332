"""CLIP ViT (Megatron ``CLIPViTModel``) applied per frame, spatially pooled to a fixed token count per frame.

Video ``[B, T, 3, H, W]`` (or images ``[B, 3, H, W]``) → ViT per frame (its first ``num_layers + 1 + feature_layer``
layers: LLaVA reads the penultimate one) → patch grid ``[B*T, g, g, Hv]`` → adaptive average pool to ``s x s`` →
``[B, T*s*s, Hv]`` (batch-major, frame-major rows); with ``drop_class_token=False`` each frame's class token comes
first (``[B, T*(1+s*s), Hv]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mimo_ray.media.frames import normalize_pixels
from mimo_ray.parallel.megatron_setup import building_on_cpu


class FrameCLIPEncoder(torch.nn.Module):
    """CLIP ViT over every frame plus spatial pooling.

    Args:
        transformer_config: ViT transformer config (width Hv).
        transformer_layer_spec: ViT layer spec (bidirectional attention).
        patch_dim: patch side in pixels.
        img_size: frame side in pixels (frames are square).
        tokens_per_frame: pooled patch tokens per frame, a square number ``s*s <= (img_size/patch_dim)**2``.
        drop_class_token: drop the class token (else it precedes each frame's patch tokens).
    """

    def __init__(
        self,
        transformer_config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        patch_dim: int,
        img_size: int,
        tokens_per_frame: int,
        drop_class_token: bool = True,
    ) -> None:
        super().__init__()
        with building_on_cpu():
            self.vit = CLIPViTModel(
                transformer_config,
                transformer_layer_spec,
                ln_pre_impl=WrappedTorchNorm,
                add_class_token=True,
                class_token_len=1,
                patch_dim=patch_dim,
                img_h=img_size,
                img_w=img_size,
                model_subtype="clip",
            )
        self.grid = img_size // patch_dim
        self.pool_side = round(tokens_per_frame**0.5)
        self.drop_class_token = drop_class_token

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode frames.

        Args:
            pixel_values: uint8 RGB ``[B, T, H, W, 3]`` video or ``[B, H, W, 3]`` images as decoded (normalised
                here, on the encoder's device), or float ``[B, T, 3, H, W]`` / ``[B, 3, H, W]`` already
                CLIP-normalised.

        Returns:
            ``[B, T * tokens_per_frame, Hv]`` (``[B, T * (1 + tokens_per_frame), Hv]`` keeping the class token).
        """
        if pixel_values.dtype == torch.uint8:
            pixel_values = normalize_pixels(pixel_values, self.vit.conv1.weight.dtype)
        if pixel_values.dim() == 4:
            pixel_values = pixel_values.unsqueeze(1)
        b, t = pixel_values.shape[:2]
        frames = pixel_values.flatten(0, 1).to(self.vit.conv1.weight.dtype)  # [B*T, 3, H, W]
        # position_ids is a plain attribute (not a buffer) upstream, so it does not follow .to(device).
        if self.vit.position_ids.device != frames.device:
            self.vit.position_ids = self.vit.position_ids.to(frames.device)
        hidden = self.vit(frames)  # [B*T, 1 + g*g, Hv]
        patches = hidden[:, 1:, :]
        hv = patches.shape[-1]
        grid = patches.reshape(b * t, self.grid, self.grid, hv).permute(0, 3, 1, 2)  # [B*T, Hv, g, g]
        if self.pool_side != self.grid:
            grid = F.adaptive_avg_pool2d(grid, self.pool_side)
        tokens = grid.flatten(2).transpose(1, 2)  # [B*T, s*s, Hv]
        if not self.drop_class_token:
            tokens = torch.cat([hidden[:, :1, :], tokens], dim=1)  # [B*T, 1 + s*s, Hv]
        return tokens.reshape(b, t * tokens.shape[1], hv)
