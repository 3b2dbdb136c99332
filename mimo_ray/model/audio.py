"""Audio encoders on Megatron ``TransformerBlock``s, each pooled to exactly ``audio_seq_len`` tokens.

- Whisper-style: log-mel ``[B, n_mels, T]`` → Conv1d(k3) → GELU → Conv1d(k3, stride 2) → GELU →
  + sinusoidal positions → TransformerBlock (bidirectional) → final norm → pool over time.
- BEATs-style: fbank ``[B, n_bins, T]`` → 16x16 patches (Conv2d) → + learned positions → LayerNorm →
  TransformerBlock → final norm → pool over patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions, ``[length, channels]``."""
    half = channels // 2
    scale = math.log(10000) / max(half - 1, 1)
    inv = torch.exp(-scale * torch.arange(half, dtype=torch.float32))
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def pool_sequence(hidden_BSH: torch.Tensor, out_len: int) -> torch.Tensor:
    """Average-pool ``[B, S, H]`` over S to exactly ``out_len`` positions → ``[B, out_len, H]``."""
    if hidden_BSH.shape[1] == out_len:
        return hidden_BSH
    return F.adaptive_avg_pool1d(hidden_BSH.transpose(1, 2), out_len).transpose(1, 2)


class WhisperEncoder(torch.nn.Module):
    """Whisper-shaped encoder.

    Args:
        transformer_config: encoder transformer config (width Ha).
        transformer_layer_spec: layer spec (bidirectional attention).
        n_mels: mel bins of the input.
        num_frames: mel frames per clip (positions are ``ceil(num_frames / 2)``).
        audio_seq_len: output tokens per clip.
    """

    def __init__(
        self,
        transformer_config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        n_mels: int,
        num_frames: int,
        audio_seq_len: int,
    ) -> None:
        super().__init__()
        hidden = transformer_config.hidden_size
        dtype = transformer_config.params_dtype
        self.conv1 = torch.nn.Conv1d(n_mels, hidden, kernel_size=3, padding=1, dtype=dtype)
        self.conv2 = torch.nn.Conv1d(hidden, hidden, kernel_size=3, stride=2, padding=1, dtype=dtype)
        self.num_positions = (num_frames - 1) // 2 + 1
        # Persistent: a checkpoint's table (pretrained ones are fp16-rounded) survives save / resume / import.
        self.register_buffer("positions", sinusoids(self.num_positions, hidden).to(dtype), persistent=True)
        self.block = TransformerBlock(transformer_config, transformer_layer_spec, pre_process=True, post_process=True)
        self.audio_seq_len = audio_seq_len

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """Encode log-mel spectrograms.

        Args:
            input_features: ``[B, n_mels, T]``.

        Returns:
            ``[B, audio_seq_len, Ha]``.
        """
        x = input_features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # [B, Ha, T']
        x = x.transpose(1, 2)  # [B, T', Ha]
        if x.shape[1] != self.num_positions:
            raise ValueError(
                f"whisper encoder expects {self.num_positions} positions (from its configured mel frames), "
                f"got {x.shape[1]} from input_features of shape {tuple(input_features.shape)}"
            )
        x = x + self.positions
        hidden = self.block(x.transpose(0, 1).contiguous(), attention_mask=None)  # [T', B, Ha]
        return pool_sequence(hidden.transpose(0, 1), self.audio_seq_len)


class BeatsEncoder(torch.nn.Module):
    """BEATs-shaped encoder over 16x16 fbank patches.

    Args:
        transformer_config: encoder transformer config (width Ha).
        transformer_layer_spec: layer spec (bidirectional attention).
        n_bins: fbank bins of the input (a multiple of ``patch_size``).
        num_frames: fbank frames per clip.
        patch_size: patch side.
        audio_seq_len: output tokens per clip.
    """

    def __init__(
        self,
        transformer_config: TransformerConfig,
        transformer_layer_spec: ModuleSpec,
        n_bins: int,
        num_frames: int,
        patch_size: int,
        audio_seq_len: int,
    ) -> None:
        super().__init__()
        hidden = transformer_config.hidden_size
        dtype = transformer_config.params_dtype
        self.patch_size = patch_size
        self.patch_embed = torch.nn.Conv2d(
            1, hidden, kernel_size=patch_size, stride=patch_size, bias=False, dtype=dtype
        )
        self.num_patches = (num_frames // patch_size) * (n_bins // patch_size)
        self.pos_embed = torch.nn.Parameter(torch.zeros(self.num_patches, hidden, dtype=dtype))
        torch.nn.init.normal_(self.pos_embed, std=transformer_config.init_method_std)
        self.norm = torch.nn.LayerNorm(hidden, eps=transformer_config.layernorm_epsilon, dtype=dtype)
        self.block = TransformerBlock(transformer_config, transformer_layer_spec, pre_process=True, post_process=True)
        self.audio_seq_len = audio_seq_len

    def forward(self, input_features: torch.Tensor) -> torch.Tensor:
        """Encode fbank features.

        Args:
            input_features: ``[B, n_bins, T]``.

        Returns:
            ``[B, audio_seq_len, Ha]``.
        """
        x = input_features.to(self.patch_embed.weight.dtype).transpose(1, 2).unsqueeze(1)  # [B, 1, T, n_bins]
        t_keep = (x.shape[2] // self.patch_size) * self.patch_size
        x = self.patch_embed(x[:, :, :t_keep])  # [B, Ha, T/16, n_bins/16]
        x = x.flatten(2).transpose(1, 2)  # [B, P, Ha], time-major patches
        if x.shape[1] != self.num_patches:
            raise ValueError(
                f"beats encoder expects {self.num_patches} patches, got {x.shape[1]} from input_features of "
                f"shape {tuple(input_features.shape)}"
            )
        x = self.norm(x + self.pos_embed)
        hidden = self.block(x.transpose(0, 1).contiguous(), attention_mask=None)  # [P, B, Ha]
        return pool_sequence(hidden.transpose(0, 1), self.audio_seq_len)
