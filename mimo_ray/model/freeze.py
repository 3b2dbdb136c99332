"""Freezing for staged training (``model.freeze``): which parameters train, and frozen encoders run forward-only.

Parts by fused-model name: ``vision`` = ``modality_submodules.{video,images}.encoders.``, ``audio`` =
``modality_submodules.audio.encoders.``, ``projections`` = ``modality_submodules.*.input_projections.``, ``lm`` =
``language_model.`` (output decoders always train).

    freeze_parts(module, cfg.model, prefix="modality_submodules.")     # an encoder stage's ModuleDict
    trainable_modalities(cfg.model)                                    # modalities whose embeddings need gradients
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_ray.config import ModelConfig

VISION_MODALITIES = ("video", "images")


def part_of(name: str) -> str | None:
    """The freezable part a fused-model parameter name belongs to (``None``: output decoders)."""
    if name.startswith("language_model."):
        return "lm"
    if name.startswith("modality_submodules."):
        modality, rest = name.split(".")[1], ".".join(name.split(".")[2:])
        if rest.startswith("input_projections."):
            return "projections"
        return "vision" if modality in VISION_MODALITIES else "audio"
    return None


def encoder_part(modality: str) -> str:
    """``vision`` or ``audio``: the freezable part of a modality's encoder."""
    return "vision" if modality in VISION_MODALITIES else "audio"


def trainable_modalities(model: ModelConfig) -> list[str]:
    """Modalities whose encoder or projection trains, so whose embedding rows need gradients from the LM."""
    frozen = set(model.freeze)
    return [m for m in model.modalities if not (encoder_part(m) in frozen and "projections" in frozen)]


def _no_grad_pre(_module: torch.nn.Module, _args: Any) -> None:
    _module._mimo_grad_mode = torch.is_grad_enabled()
    torch.set_grad_enabled(False)


def _restore_post(_module: torch.nn.Module, _args: Any, _out: Any) -> None:
    torch.set_grad_enabled(_module._mimo_grad_mode)


def freeze_parts(module: torch.nn.Module, model: ModelConfig, prefix: str = "") -> dict[str, int]:
    """Turn off ``requires_grad`` for the frozen parts and make frozen encoders run under ``no_grad``.

    Args:
        module: a stage's module (fused model, encoder ModuleDict or LM half).
        model: the model config (``model.freeze``).
        prefix: what maps the module's parameter names onto the fused model's.

    Returns:
        ``{"trainable": count, "frozen": count}`` parameter elements.
    """
    frozen = set(model.freeze)
    counts = {"trainable": 0, "frozen": 0}
    for name, param in module.named_parameters():
        if part_of(prefix + name) in frozen:
            param.requires_grad_(False)
        counts["trainable" if param.requires_grad else "frozen"] += param.numel()
    if frozen & {"vision", "audio"}:
        for name, sub in module.named_modules():
            full = prefix + name
            parts = full.split(".")
            if len(parts) == 4 and parts[0] == "modality_submodules" and parts[2] == "encoders":
                if encoder_part(parts[1]) in frozen:
                    sub.register_forward_pre_hook(_no_grad_pre)
                    sub.register_forward_hook(_restore_post)
    return counts
