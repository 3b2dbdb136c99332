"""``jobs/convert.py export``: a run's checkpoint → Hugging Face directories that ``transformers`` loads.

    dirs = export_run("runs/avlm", "hf_out")      # {"lm": hf_out/lm, "vision": hf_out/vision, "audio": hf_out/audio}

The checkpoint may come from any runtime (fused, encoder groups, LM TP shards: joined with the stride rule) or be a
step-0 import. The LM gets our vocabulary without padding, the run's tokenizer and chat template. Encoders are
written in their source directory's layout: tensors mimo_ray does not hold (CLIP's text tower and post-norm, CLIP
layers past ``feature_layer``, Whisper's decoder, Whisper positions past the configured clip) are copied from the
directory the run recorded in ``model.pretrained``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.config_cli import config_from_dict
from mimo_ray.convert.hf_dir import HFDir
from mimo_ray.convert.importer import clip_prefix, whisper_prefix
from mimo_ray.convert.mapping import Rule, clip_rules, lm_rules, split, whisper_rules

SKIP_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def full_state(step: Path, cfg: Config) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint under the fused model's names, TP shards joined
    (:func:`mimo_ray.driver.init_from.checkpoint_full_state`).

    Raises:
        ValueError: the checkpoint holds no model files.
    """
    from mimo_ray.driver.init_from import checkpoint_full_state

    return checkpoint_full_state(step, cfg.model.lm.swiglu)


def _export_tensors(rules: list[Rule], state: dict[str, torch.Tensor], rows: dict[str, int] | None = None,
                    ) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.ours not in state:
            raise ValueError(f"the checkpoint has no tensor {rule.ours!r}")
        ours = state[rule.ours].float()
        if rule.kind == "rows" and rows and rule.ours in rows:
            ours = ours[: rows[rule.ours]]
        for key, tensor in zip(rule.hf, split(rule, ours), strict=True):
            if key is not None:
                out[key] = tensor.contiguous().clone()
    return out


def _save(tensors: dict[str, torch.Tensor], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _copy_side_files(src: Path, out: Path) -> None:
    for file in src.iterdir():
        if file.is_file() and file.name not in SKIP_FILES and not file.name.endswith((".safetensors", ".bin")):
            shutil.copyfile(file, out / file.name)


def _with_source(src: HFDir | None, ours: dict[str, torch.Tensor], rows_from_source: dict[str, int]
                 ) -> dict[str, torch.Tensor]:
    """Our tensors plus every source tensor we do not hold; tables we keep only the head of get the source tail."""
    if src is None:
        return ours
    out = {}
    for key in src.keys():
        if key in ours:
            value = ours[key]
            if key in rows_from_source:
                tail = src.get(key)[value.shape[0]:].to(value.dtype)
                value = torch.cat([value, tail]) if tail.numel() else value
            out[key] = value
        else:
            out[key] = src.get(key).contiguous().clone()
    return out


def _lm_config(cfg: Config, source: dict[str, Any] | None) -> dict[str, Any]:
    lm = cfg.model.lm
    base = dict(source) if source else {
        "architectures": ["Qwen2ForCausalLM" if lm.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if lm.qkv_bias else "llama",
        "hidden_act": "silu",
        "max_position_embeddings": lm.seq_length,
    }
    base.update({
        "vocab_size": lm.vocab_size,
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.ffn_hidden_size or 4 * lm.hidden_size,
        "num_hidden_layers": lm.num_layers,
        "num_attention_heads": lm.num_attention_heads,
        "num_key_value_heads": lm.num_query_groups or lm.num_attention_heads,
        "rms_norm_eps": lm.norm_epsilon,
        "tie_word_embeddings": not lm.untie_embeddings_and_output_weights,
        "torch_dtype": "float32",
    })
    base.pop("dtype", None)
    return base


def export_lm(cfg: Config, state: dict[str, torch.Tensor], out: Path) -> Path:
    """The LM as a ``*ForCausalLM`` directory with the run's tokenizer.

    Raises:
        ValueError: the model is not LLaMA-shaped (SwiGLU, RMSNorm, RoPE, no linear biases).
    """
    lm = cfg.model.lm
    if not (lm.swiglu and lm.normalization == "RMSNorm" and lm.position_embedding_type == "rope"
            and not lm.add_bias_linear):
        raise ValueError("only LLaMA-shaped LMs export (model.lm.swiglu, RMSNorm, rope, add_bias_linear=false)")
    rules = lm_rules(cfg.model, "model.", lm.vocab_size)
    rows = {r.ours: lm.vocab_size for r in rules if r.kind == "rows"}
    tensors = _export_tensors(rules, state, rows)
    _save(tensors, out)
    src_dir = cfg.model.pretrained.get("lm")
    source = HFDir(src_dir, "model.pretrained.lm").config if src_dir and Path(src_dir).is_dir() else None
    (out / "config.json").write_text(json.dumps(_lm_config(cfg, source), indent=2))
    if cfg.data.tokenizer != "byte":
        tok_dir = Path(cfg.data.tokenizer).parent
        for file in tok_dir.iterdir():
            if file.is_file():
                shutil.copyfile(file, out / file.name)
    return out


def export_vision(cfg: Config, state: dict[str, torch.Tensor], modality: str, out: Path) -> Path:
    """One vision modality's CLIP tower, in the source directory's layout when the run recorded one."""
    src_dir = cfg.model.pretrained.get("vision")
    src = HFDir(src_dir, "model.pretrained.vision") if src_dir and Path(src_dir).is_dir() else None
    prefix = clip_prefix(src) if src is not None else ""
    tensors = _with_source(src, _export_tensors(clip_rules(cfg.model, modality, prefix), state), {})
    _save(tensors, out)
    if src is not None:
        _copy_side_files(src.path, out)
    else:
        v = cfg.model.vision
        (out / "config.json").write_text(json.dumps({
            "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.ffn_hidden_size or 4 * v.hidden_size, "num_hidden_layers": v.built_layers,
            "num_attention_heads": v.num_attention_heads, "image_size": v.img_size, "patch_size": v.patch_dim,
            "hidden_act": v.activation, "layer_norm_eps": v.layernorm_epsilon, "num_channels": 3,
        }, indent=2))
    return out


def export_audio(cfg: Config, state: dict[str, torch.Tensor], out: Path) -> Path:
    """The Whisper encoder inside a copy of the source Whisper directory (its decoder comes from there).

    Raises:
        ValueError: the run recorded no source Whisper directory.
    """
    src_dir = cfg.model.pretrained.get("audio")
    if not src_dir or not Path(src_dir).is_dir():
        raise ValueError("exporting the Whisper encoder needs the source directory recorded in model.pretrained.audio"
                         " (its decoder is not part of mimo_ray)")
    src = HFDir(src_dir, "model.pretrained.audio")
    prefix = whisper_prefix(src)
    ours = _export_tensors(whisper_rules(cfg.model, prefix), state)
    tensors = _with_source(src, ours, {f"{prefix}embed_positions.weight": 0})
    _save(tensors, out)
    _copy_side_files(src.path, out)
    return out


def export_run(checkpoint: str, output: str) -> dict[str, Path]:
    """Export every part a run holds: ``lm`` (always), ``vision`` / ``audio`` when those modalities exist.

    Returns:
        ``{part: directory}``.

    Raises:
        ValueError: no complete checkpoint, or a part that cannot be exported (naming why).
    """
    from mimo_ray.driver import checkpoint as ckpt

    step = ckpt.resolve(checkpoint)
    cfg = config_from_dict(json.loads((step / "driver.json").read_text())["config"])
    state = full_state(step, cfg)
    out = Path(output)
    written: dict[str, Path] = {"lm": export_lm(cfg, state, out / "lm")}
    vision_mods = [m for m in cfg.model.modalities if m in ("video", "images")]
    for i, mod in enumerate(vision_mods):
        written["vision" if i == 0 else f"vision-{mod}"] = export_vision(
            cfg, state, mod, out / ("vision" if i == 0 else f"vision-{mod}"))
    if "audio" in cfg.model.modalities and cfg.model.audio.backbone_type == "whisper" and cfg.model.pretrained.get(
            "audio"):
        written["audio"] = export_audio(cfg, state, out / "audio")
    return written
