"""The MIMO model: Megatron encoders → projections → placeholder alignment → GPT, fused or in halves."""

from __future__ import annotations

import torch
from megatron.core.models.mimo import MimoModelConfig

from mimo_ray.config import Config
from mimo_ray.model.decoders import OutputDecoders
from mimo_ray.model.mimo import MimoRayModel, build_part, encode_modalities, part_seed
from mimo_ray.model.spec import INPUT_KWARG, encoder_name, input_shape, tokens_per_sample
from mimo_ray.model.spec_source import build_mimo_config, config_for_spec, resolve_mimo_config

__all__ = [
    "INPUT_KWARG",
    "MimoRayModel",
    "build_decoder_part",
    "build_encoder_part",
    "build_fused_model",
    "build_lm_part",
    "build_mimo_config",
    "config_for_spec",
    "encode_modalities",
    "encoder_name",
    "input_shape",
    "tokens_per_sample",
]


def build_fused_model(cfg: Config, spec: MimoModelConfig | None = None) -> MimoRayModel:
    """The whole model in one process: a ``megatron.core.models.mimo.MimoModel`` (the numerical reference).

    Megatron must be initialised in this process first (:func:`mimo_ray.parallel.megatron_setup.init_megatron`).

    Args:
        cfg: the config.
        spec: the run's ``MimoModelConfig`` (``None``: :func:`build_mimo_config` of ``cfg``).
    """
    spec = resolve_mimo_config(cfg, spec)
    return MimoRayModel(spec, init_seed=cfg.train.seed, model_cfg=cfg.model)


def build_lm_part(cfg: Config, spec: MimoModelConfig | None = None) -> MimoRayModel:
    """The language-model half: a ``MimoModel`` without modality submodules, same weights as the fused one (output
    decoders included when ``model.outputs`` enables any: they live beside the LM).
    """
    spec = resolve_mimo_config(cfg, spec)
    lm_only = MimoModelConfig(
        language_model_spec=spec.language_model_spec,
        modality_submodules_spec={},
        special_token_ids=dict(spec.special_token_ids),
    )
    return MimoRayModel(lm_only, init_seed=cfg.train.seed, model_cfg=cfg.model)


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


def build_encoder_part(
    cfg: Config, modalities: list[str] | None = None, spec: MimoModelConfig | None = None
) -> torch.nn.ModuleDict:
    """The encoder half for ``modalities`` (all configured when ``None``), same weights as the fused model's
    ``modality_submodules`` (each part seeded from its modality name); keys are modality names, so state dicts map
    1:1 onto the fused model's.

    Raises:
        ValueError: a modality the spec has no ``modality_submodules_spec`` entry for (naming it).
    """
    names = list(cfg.model.modalities) if modalities is None else modalities
    if spec is None:
        from mimo_ray.model.spec import modality_spec

        parts = {m: modality_spec(cfg.model, m) for m in names}
    else:
        missing = [m for m in names if m not in spec.modality_submodules_spec]
        if missing:
            raise ValueError(
                f"modalities {missing} have no entry in MimoModelConfig.modality_submodules_spec "
                f"(it has {sorted(spec.modality_submodules_spec)})"
            )
        parts = {m: spec.modality_submodules_spec[m] for m in names}
    return torch.nn.ModuleDict({m: build_part(parts[m], cfg.train.seed, m) for m in names})
