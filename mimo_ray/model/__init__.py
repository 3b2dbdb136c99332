"""The MIMO model: Megatron encoders → projections → placeholder alignment → GPT, fused or in halves."""

from __future__ import annotations

import torch

from mimo_ray.config import Config
from mimo_ray.model.decoders import OutputDecoders
from mimo_ray.model.mimo import MimoRayModel, build_part, encode_modalities, part_seed
from mimo_ray.model.spec import INPUT_KWARG, encoder_name, input_shape, mimo_config, modality_spec, tokens_per_sample

__all__ = [
    "INPUT_KWARG",
    "MimoRayModel",
    "build_decoder_part",
    "build_encoder_part",
    "build_fused_model",
    "build_lm_part",
    "encode_modalities",
    "encoder_name",
    "input_shape",
    "tokens_per_sample",
]


def build_fused_model(cfg: Config) -> MimoRayModel:
    """The whole model in one process: a ``megatron.core.models.mimo.MimoModel`` (the numerical reference).

    Megatron must be initialised in this process first (:func:`mimo_ray.parallel.megatron_setup.init_megatron`).
    """
    return MimoRayModel(mimo_config(cfg.model, lm_tp=cfg.parallel.lm_tp), init_seed=cfg.train.seed, model_cfg=cfg.model)


def build_lm_part(cfg: Config) -> MimoRayModel:
    """The language-model half: a ``MimoModel`` without modality submodules, same weights as the fused one (output
    decoders included when ``model.outputs`` enables any: they live beside the LM).
    """
    spec = mimo_config(cfg.model, modalities=[], lm_tp=cfg.parallel.lm_tp)
    return MimoRayModel(spec, init_seed=cfg.train.seed, model_cfg=cfg.model)


def build_decoder_part(cfg: Config) -> OutputDecoders:
    """The output decoders alone, same weights as the fused model's ``output_decoders`` (seeded as that part).

    Raises:
        ValueError: ``model.outputs`` enables no output.
    """
    if not cfg.model.outputs.active():
        raise ValueError("model.outputs enables no output; there are no decoders to build")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(cfg.train.seed, "output_decoders"))
        return OutputDecoders(cfg.model)


def build_encoder_part(cfg: Config, modalities: list[str] | None = None) -> torch.nn.ModuleDict:
    """The encoder half for ``modalities`` (all configured when ``None``), same weights as the fused model's
    ``modality_submodules``; keys are modality names, so state dicts map 1:1 onto the fused model's.
    """
    names = list(cfg.model.modalities) if modalities is None else modalities
    return torch.nn.ModuleDict(
        {m: build_part(modality_spec(cfg.model, m), cfg.train.seed, m) for m in names}
    )
