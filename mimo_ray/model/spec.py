"""Config → Megatron ``ModuleSpec``s: the language model, one ``ModalitySubmodules`` per input modality, and the
``MimoModelConfig`` that ties them together with the special token ids (Megatron MIMO's spec/builder words).
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.core.models.mimo import MimoModelConfig
from megatron.core.models.mimo.submodules.audio import AudioModalitySubmodules
from megatron.core.models.mimo.submodules.vision import VisionModalitySubmodules
from megatron.core.models.vision.multimodal_projector import MultimodalProjector
from megatron.core.transformer.spec_utils import ModuleSpec

from mimo_ray.config import Config, ModelConfig
from mimo_ray.model.audio import BeatsEncoder, WhisperEncoder
from mimo_ray.model.layers import layer_spec, lm_layer_spec, mlp_spec, transformer_config
from mimo_ray.model.vision import FrameCLIPEncoder

# The kwarg each encoder takes inside modality_inputs[modality][encoder_name] (C1).
INPUT_KWARG = {"video": "pixel_values", "images": "pixel_values", "audio": "input_features"}


def encoder_name(model: ModelConfig, modality: str) -> str:
    """Key of the modality's encoder in ``modality_inputs[modality]``: ``clip``, ``whisper`` or ``beats``."""
    return model.audio.backbone_type if modality == "audio" else model.vision.backbone_type


def tokens_per_sample(cfg: Config | ModelConfig, modality: str) -> int:
    """The single source of truth for how many embedding rows one sample of ``modality`` yields.

    Args:
        cfg: the config (or its model section).
        modality: ``video``, ``images`` or ``audio``.

    Returns:
        Rows per sample: ``num_frames * tokens_out_per_frame`` for video, ``tokens_out_per_frame`` for an image
        (``tokens_per_frame``, plus one when the class token is kept), ``audio_seq_len`` for audio.

    Raises:
        ValueError: a user modality without ``model.modality_tokens.<name>``.
    """
    model = cfg.model if isinstance(cfg, Config) else cfg
    if modality == "video":
        return model.vision.num_frames * model.vision.tokens_out_per_frame
    if modality == "images":
        return model.vision.tokens_out_per_frame
    if modality == "audio":
        return model.audio.audio_seq_len
    if modality in model.modality_tokens:
        return model.modality_tokens[modality]
    raise ValueError(
        f"modality {modality!r} is a user modality: set model.modality_tokens.{modality} to the embedding rows one "
        f"item of it yields (the tag {model.tag(modality)} expands to that many placeholder tokens)"
    )


def input_shape(cfg: Config | ModelConfig, modality: str) -> tuple[int, ...]:
    """Per-sample shape of a modality's encoder input (without the batch dim).

    Returns:
        video ``[T, 3, H, W]``, images ``[3, H, W]``, whisper audio ``[n_mels, T]``, beats audio ``[n_bins, T]``.
    """
    model = cfg.model if isinstance(cfg, Config) else cfg
    v, a = model.vision, model.audio
    if modality == "video":
        return (v.num_frames, 3, v.img_size, v.img_size)
    if modality == "images":
        return (3, v.img_size, v.img_size)
    if modality == "audio":
        bins = a.n_mels if a.backbone_type == "whisper" else a.fbank_bins
        return (bins, a.num_input_frames)
    raise ValueError(f"modality {modality!r} is a user modality: mimo_ray knows no input shape for it")


def _projector_spec(model: ModelConfig, input_size: int, projector_type: str, ffn: int | None) -> ModuleSpec:
    lm = model.lm
    config = transformer_config(
        model,
        num_layers=1,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        ffn_hidden_size=ffn or lm.hidden_size,
    )
    return ModuleSpec(
        module=MultimodalProjector,
        params={"config": config, "projector_type": projector_type, "input_size": input_size},
        submodules=mlp_spec().submodules,
    )


def _vision_encoder_spec(model: ModelConfig) -> ModuleSpec:
    v = model.vision
    config = transformer_config(
        model,
        num_layers=v.built_layers,
        hidden_size=v.hidden_size,
        num_attention_heads=v.num_attention_heads,
        ffn_hidden_size=v.ffn_hidden_size,
        activation=v.activation,
        layernorm_epsilon=v.layernorm_epsilon,
    )
    return ModuleSpec(
        module=FrameCLIPEncoder,
        params={
            "transformer_config": config,
            "transformer_layer_spec": layer_spec(model.attention_backend, causal=False),
            "patch_dim": v.patch_dim,
            "img_size": v.img_size,
            "tokens_per_frame": v.tokens_per_frame,
            "drop_class_token": v.drop_class_token,
        },
    )


def _audio_encoder_spec(model: ModelConfig) -> ModuleSpec:
    a = model.audio
    config = transformer_config(
        model,
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size,
        layernorm_epsilon=a.layernorm_epsilon,
    )
    common = {
        "transformer_config": config,
        "transformer_layer_spec": layer_spec(model.attention_backend, causal=False),
        "num_frames": a.num_input_frames,
        "audio_seq_len": a.audio_seq_len,
    }
    if a.backbone_type == "whisper":
        return ModuleSpec(module=WhisperEncoder, params={**common, "n_mels": a.n_mels})
    return ModuleSpec(module=BeatsEncoder, params={**common, "n_bins": a.fbank_bins, "patch_size": a.patch_size})


def modality_spec(model: ModelConfig, modality: str) -> ModuleSpec:
    """``ModalitySubmodules`` spec for one input modality: its encoder plus an MLP projection to the LM width."""
    if modality in ("video", "images"):
        v = model.vision
        return ModuleSpec(
            module=VisionModalitySubmodules,
            submodules={
                "encoders": {encoder_name(model, modality): _vision_encoder_spec(model)},
                "input_projections": [
                    _projector_spec(model, v.hidden_size, v.projector_type, v.projector_ffn_hidden_size)
                ],
            },
        )
    if modality == "audio":
        a = model.audio
        return ModuleSpec(
            module=AudioModalitySubmodules,
            submodules={
                "encoders": {encoder_name(model, modality): _audio_encoder_spec(model)},
                "input_projections": [
                    _projector_spec(model, a.hidden_size, a.projector_type, a.projector_ffn_hidden_size)
                ],
            },
        )
    raise ValueError(
        f"model.modalities names {modality!r}, for which mimo_ray builds no spec: add "
        f"modality_submodules_spec[{modality!r}] to the MimoModelConfig you pass as mimo_config=, or set "
        "model.spec_factory (mimo_ray.build_mimo_config builds our modalities video, audio, images)"
    )


def language_model_spec(model: ModelConfig, lm_tp: int = 1) -> ModuleSpec:
    """Megatron ``GPTModel`` spec.

    Args:
        model: the model section.
        lm_tp: ``parallel.lm_tp``; the vocabulary is padded for it (the same rows for every runtime).
    """
    lm = model.lm
    config = transformer_config(
        model,
        num_layers=lm.num_layers,
        hidden_size=lm.hidden_size,
        num_attention_heads=lm.num_attention_heads,
        ffn_hidden_size=lm.ffn_hidden_size,
        num_query_groups=lm.num_query_groups,
        normalization=lm.normalization,
        swiglu=lm.swiglu,
        add_bias_linear=lm.add_bias_linear,
        layernorm_epsilon=lm.norm_epsilon,
        qkv_bias=lm.qkv_bias,
    )
    return ModuleSpec(
        module=GPTModel,
        params={
            "config": config,
            "transformer_layer_spec": lm_layer_spec(model),
            "vocab_size": lm.padded_vocab_size(lm_tp),
            "max_sequence_length": lm.seq_length,
            "position_embedding_type": lm.position_embedding_type,
            "share_embeddings_and_output_weights": not lm.untie_embeddings_and_output_weights,
            "rotary_base": lm.rotary_base,
            "rope_scaling": lm.rope_scaling_factor is not None,
            "rope_scaling_factor": lm.rope_scaling_factor or 8.0,
            "pre_process": True,
            "post_process": True,
        },
    )


def mimo_config(model: ModelConfig, modalities: list[str] | None = None, lm_tp: int = 1) -> MimoModelConfig:
    """``MimoModelConfig`` with the given input modalities (all configured ones when ``None``; ``[]`` = LM only);
    ``lm_tp`` (``parallel.lm_tp``) sets the vocabulary padding.

    Special token ids always cover every configured modality, so an LM-only model still aligns their rows.
    """
    modalities = list(model.modalities) if modalities is None else modalities
    return MimoModelConfig(
        language_model_spec=language_model_spec(model, lm_tp),
        modality_submodules_spec={m: modality_spec(model, m) for m in modalities},
        special_token_ids={m: model.special_token_ids[m] for m in model.modalities},
    )
