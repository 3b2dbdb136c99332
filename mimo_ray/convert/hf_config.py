"""Hugging Face ``config.json`` → mimo_ray config overrides (architecture knobs, sizes), refusing what we cannot run
exactly.

    over = lm_overrides(HFDir("vicuna").config)      # ["model.lm.num_layers=32", ...]
"""

from __future__ import annotations

from typing import Any

LM_TYPES = ("llama", "mistral", "qwen2")
# Megatron's Llama-3 RoPE scaling has these fixed (rotary_pos_embedding._apply_scaling).
LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling dict or None)`` from a transformers 4.x (``rope_theta``/``rope_scaling``) or 5.x
    (``rope_parameters``) config.
    """
    params = cfg.get("rope_parameters") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), scaling


def lm_overrides(cfg: dict[str, Any], where: str = "--lm config.json") -> list[str]:
    """Overrides for ``model.lm`` from a LLaMA / Mistral / Qwen2 config (vocabulary excluded: it depends on the
    tokenizer).

    Raises:
        ValueError: naming the config key whose value mimo_ray cannot reproduce exactly.
    """
    kind = cfg.get("model_type")
    if kind not in LM_TYPES:
        raise ValueError(f"{where}: model_type={kind!r} is not supported; supported LMs: {', '.join(LM_TYPES)}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={cfg['hidden_act']!r} is not supported (SwiGLU needs 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ValueError(f"{where}: {key}=true is not supported")
    if kind == "qwen2" and cfg.get("use_sliding_window"):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise ValueError(f"{where}: head_dim={head_dim} != hidden_size / num_attention_heads = {hidden // heads}")
    theta, scaling = _rope(cfg)
    if not float(theta).is_integer():
        raise ValueError(f"{where}: rope_theta={theta} is not an integer (model.lm.rotary_base is one)")
    out = [
        f"model.lm.num_layers={cfg['num_hidden_layers']}",
        f"model.lm.hidden_size={hidden}",
        f"model.lm.num_attention_heads={heads}",
        f"model.lm.num_query_groups={cfg.get('num_key_value_heads') or heads}",
        f"model.lm.ffn_hidden_size={cfg['intermediate_size']}",
        "model.lm.position_embedding_type=rope",
        "model.lm.normalization=RMSNorm",
        "model.lm.swiglu=true",
        "model.lm.add_bias_linear=false",
        f"model.lm.qkv_bias={'true' if kind == 'qwen2' else 'false'}",
        f"model.lm.untie_embeddings_and_output_weights={'false' if cfg.get('tie_word_embeddings') else 'true'}",
        f"model.lm.rotary_base={int(theta)}",
        f"model.lm.norm_epsilon={cfg.get('rms_norm_eps', 1e-6)}",
    ]
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise ValueError(f"{where}: rope_scaling type {rope_type!r} is not supported (only 'llama3')")
        for key, want in LLAMA3_FIXED.items():
            if float(scaling.get(key, want)) != want:
                raise ValueError(f"{where}: rope_scaling.{key}={scaling[key]} is not supported (only {want})")
        out.append(f"model.lm.rope_scaling_factor={float(scaling['factor'])}")
    else:
        out.append("model.lm.rope_scaling_factor=null")
    return out


def lm_seq_limit(cfg: dict[str, Any]) -> int | None:
    """Longest sequence the LM runs exactly: the sliding window of Mistral-style configs, if any."""
    window = cfg.get("sliding_window")
    return int(window) if window and cfg.get("model_type") == "mistral" else None


def vision_overrides(cfg: dict[str, Any], where: str = "--vision config.json") -> list[str]:
    """Overrides for ``model.vision`` from a ``CLIPVisionConfig`` (or a ``CLIPModel`` config's ``vision_config``).

    Raises:
        ValueError: not a CLIP config, or an activation / channel count we cannot reproduce.
    """
    if cfg.get("model_type") == "clip":
        cfg = cfg.get("vision_config") or {}
    elif cfg.get("model_type") != "clip_vision_model":
        raise ValueError(f"{where}: model_type={cfg.get('model_type')!r} is not a CLIP vision model")
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (quick_gelu or gelu)")
    if int(cfg.get("num_channels", 3)) != 3:
        raise ValueError(f"{where}: num_channels={cfg['num_channels']} is not supported (3)")
    return [
        "model.vision.backbone_type=clip",
        f"model.vision.num_layers={cfg.get('num_hidden_layers', 12)}",
        f"model.vision.hidden_size={cfg.get('hidden_size', 768)}",
        f"model.vision.num_attention_heads={cfg.get('num_attention_heads', 12)}",
        f"model.vision.ffn_hidden_size={cfg.get('intermediate_size', 3072)}",
        f"model.vision.patch_dim={cfg.get('patch_size', 32)}",
        f"model.vision.img_size={cfg.get('image_size', 224)}",
        f"model.vision.activation={act}",
        f"model.vision.layernorm_epsilon={cfg.get('layer_norm_eps', 1e-5)}",
    ]


def audio_overrides(cfg: dict[str, Any], where: str = "--audio config.json") -> list[str]:
    """Overrides for ``model.audio`` from a ``WhisperConfig`` (encoder side).

    Raises:
        ValueError: not a Whisper config, or an activation we cannot reproduce.
    """
    if cfg.get("model_type") != "whisper":
        raise ValueError(f"{where}: model_type={cfg.get('model_type')!r} is not a Whisper model")
    act = cfg.get("activation_function", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: activation_function={act!r} is not supported (gelu)")
    return [
        "model.audio.backbone_type=whisper",
        f"model.audio.num_layers={cfg['encoder_layers']}",
        f"model.audio.hidden_size={cfg['d_model']}",
        f"model.audio.num_attention_heads={cfg['encoder_attention_heads']}",
        f"model.audio.ffn_hidden_size={cfg['encoder_ffn_dim']}",
        f"model.audio.n_mels={cfg.get('num_mel_bins', 80)}",
    ]
