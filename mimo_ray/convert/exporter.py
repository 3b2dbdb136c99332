"""``jobs/convert.py export``: a run's checkpoint → Hugging Face directories that ``transformers`` loads.

    dirs = export_run("runs/avlm", "hf_out")      # {"lm": hf_out/lm, "vision": hf_out/vision, "audio": hf_out/audio}

The checkpoint may come from any runtime (fused, encoder groups, LM TP shards: joined with the stride rule), with the
LM in either layer layout (local or transformer-engine names, told apart by its keys), or be a step-0 import. The LM
gets our vocabulary without padding, the run's tokenizer and chat template. Encoders are written in their source
directory's layout: tensors mimo_ray does not hold (CLIP's text tower and post-norm, CLIP layers past
``feature_layer``, Whisper's decoder, Whisper positions past the configured clip) are copied from the directory the
run recorded in ``model.pretrained``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.config_cli import config_from_dict
from mimo_ray.convert.hf_dir import HFDir
from mimo_ray.convert.hf_save import DTYPE_NAMES, check_dtype, parse_size, save_weights, set_config_dtype
from mimo_ray.convert.importer import clip_prefix, whisper_prefix
from mimo_ray.convert.mapping import Rule, clip_rules, lm_rules, split, whisper_rules
from mimo_ray.parallel.layer_layout import LOCAL, layout_of, to_layout


@dataclass(frozen=True)
class ExportOptions:
    """How weights are written: ``dtype`` (``fp32``, ``bf16``, ``fp16``) and the largest shard (``"5GB"``)."""

    dtype: str = "fp32"
    max_shard_size: str | int = "5GB"

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        parse_size(self.max_shard_size)


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


def _save(tensors: dict[str, torch.Tensor], out: Path, opts: ExportOptions) -> None:
    save_weights(tensors, out, opts.dtype, opts.max_shard_size)


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


def _lm_config(cfg: Config, source: dict[str, Any] | None, dtype: str = "fp32") -> dict[str, Any]:
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
        "torch_dtype": DTYPE_NAMES[dtype],
    })
    base.pop("dtype", None)
    return base


def export_lm(cfg: Config, state: dict[str, torch.Tensor], out: Path, opts: ExportOptions = ExportOptions()) -> Path:
    """The LM as a ``*ForCausalLM`` directory with the run's tokenizer.

    Raises:
        ValueError: the model is not LLaMA-shaped (SwiGLU, RMSNorm, RoPE, no linear biases).
    """
    lm = cfg.model.lm
    if not (lm.swiglu and lm.normalization == "RMSNorm" and lm.position_embedding_type == "rope"
            and not lm.add_bias_linear):
        raise ValueError("only LLaMA-shaped LMs export (model.lm.swiglu, RMSNorm, rope, add_bias_linear=false)")
    lm_keys = [k for k in state if k.startswith("language_model.")]
    rules = lm_rules(cfg.model, "model.", lm.vocab_size, layout_of(lm_keys) or LOCAL)
    rows = {r.ours: lm.vocab_size for r in rules if r.kind == "rows"}
    tensors = _export_tensors(rules, state, rows)
    _save(tensors, out, opts)
    src_dir = cfg.model.pretrained.get("lm")
    source = HFDir(src_dir, "model.pretrained.lm").config if src_dir and Path(src_dir).is_dir() else None
    (out / "config.json").write_text(json.dumps(_lm_config(cfg, source, opts.dtype), indent=2))
    if cfg.data.tokenizer != "byte":
        tok_dir = Path(cfg.data.tokenizer).parent
        for file in tok_dir.iterdir():
            if file.is_file():
                shutil.copyfile(file, out / file.name)
    return out


def export_vision(cfg: Config, state: dict[str, torch.Tensor], modality: str, out: Path,
                  opts: ExportOptions = ExportOptions()) -> Path:
    """One vision modality's CLIP tower, in the source directory's layout when the run recorded one."""
    src_dir = cfg.model.pretrained.get("vision")
    src = HFDir(src_dir, "model.pretrained.vision") if src_dir and Path(src_dir).is_dir() else None
    prefix = clip_prefix(src) if src is not None else ""
    tensors = _with_source(src, _export_tensors(clip_rules(cfg.model, modality, prefix), state), {})
    _save(tensors, out, opts)
    if src is not None:
        _copy_side_files(src.path, out)
        set_config_dtype(out, opts.dtype)
    else:
        v = cfg.model.vision
        (out / "config.json").write_text(json.dumps({
            "architectures": ["CLIPVisionModel"], "model_type": "clip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.ffn_hidden_size or 4 * v.hidden_size, "num_hidden_layers": v.built_layers,
            "num_attention_heads": v.num_attention_heads, "image_size": v.img_size, "patch_size": v.patch_dim,
            "hidden_act": v.activation, "layer_norm_eps": v.layernorm_epsilon, "num_channels": 3,
            "torch_dtype": DTYPE_NAMES[opts.dtype],
        }, indent=2))
    return out


def export_audio(cfg: Config, state: dict[str, torch.Tensor], out: Path, opts: ExportOptions = ExportOptions()
                 ) -> Path:
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
    _save(tensors, out, opts)
    _copy_side_files(src.path, out)
    set_config_dtype(out, opts.dtype)
    return out


#: Megatron ``MultimodalProjector`` names → LLaVA's ``nn.Sequential`` indices (mlp2x_gelu: Linear, GELU, Linear;
#: ``affine`` is LLaVA's ``linear`` projector, one ``nn.Linear``).
PROJECTOR_KEYS = {"encoder.linear_fc1.": "0.", "encoder.linear_fc2.": "2.", "encoder.": ""}


def projector_name(modality: str, cfg: Config) -> str:
    """LLaVA's ``mm_projector`` for the first vision modality; ``<modality>_projector`` for the others (audio)."""
    vision = [m for m in cfg.model.modalities if m in ("video", "images")]
    return "mm_projector" if vision and modality == vision[0] else f"{modality}_projector"


def projector_tensors(cfg: Config, state: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    """One modality's projector under LLaVA's key names (``model.mm_projector.0.weight``, ...), or ``{}`` when the
    checkpoint holds none (a step-0 import: projections are not imported).

    Raises:
        ValueError: a projector tensor whose name has no LLaVA counterpart (naming it).
    """
    root = f"modality_submodules.{modality}.input_projections.0."
    name = projector_name(modality, cfg)
    out = {}
    for key, value in state.items():
        if not key.startswith(root) or key.endswith("_extra_state") or not isinstance(value, torch.Tensor):
            continue
        rest = key[len(root):]
        ours = next((k for k in PROJECTOR_KEYS if rest.startswith(k)), None)
        if ours is None:
            raise ValueError(f"projector tensor {key!r} has no LLaVA name (expected encoder.linear_fc1/2 or encoder.)")
        out[f"model.{name}.{PROJECTOR_KEYS[ours]}{rest[len(ours):]}"] = value.float().contiguous().clone()
    return out


def export_projectors(cfg: Config, state: dict[str, torch.Tensor], out: Path, opts: ExportOptions = ExportOptions()
                      ) -> dict[str, Path]:
    """``out/mm_projector.safetensors`` (LLaVA's layout) and ``out/<modality>_projector.safetensors`` for the others.

    Returns:
        ``{file stem: path}`` of the files written.
    """
    written = {}
    for modality in cfg.model.modalities:
        tensors = projector_tensors(cfg, state, modality)
        if tensors:
            name = projector_name(modality, cfg)
            save_weights(tensors, out, opts.dtype, opts.max_shard_size, name=f"{name}.safetensors")
            written[name] = out / f"{name}.safetensors"
    return written


def export_run(checkpoint: str, output: str, dtype: str = "fp32", max_shard_size: str | int = "5GB"
               ) -> dict[str, Path]:
    """Export every part a run holds: ``lm`` (always), ``vision`` / ``audio`` when those modalities exist, and the
    projectors (``mm_projector``, ``audio_projector``) when the checkpoint holds them.

    Args:
        checkpoint: a run dir, its ``checkpoints/`` or a ``step_<N>``.
        output: the folder that receives ``lm/``, ``vision/``, ``audio/`` and ``*_projector.safetensors``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for every file (recorded as ``torch_dtype`` in each ``config.json``).
        max_shard_size: weights past this size are sharded with an index, like ``save_pretrained`` (``"5GB"``).

    Returns:
        ``{part: directory or file}``.

    Raises:
        ValueError: no complete checkpoint, a bad dtype or size, or a part that cannot be exported (naming why).
    """
    from mimo_ray.driver import checkpoint as ckpt

    opts = ExportOptions(dtype, max_shard_size)
    step = ckpt.resolve(checkpoint)
    cfg = config_from_dict(json.loads((step / "driver.json").read_text())["config"])
    state = to_layout(full_state(step, cfg), LOCAL)  # encoders too, were they built from TE layers
    out = Path(output)
    written: dict[str, Path] = {"lm": export_lm(cfg, state, out / "lm", opts)}
    vision_mods = [m for m in cfg.model.modalities if m in ("video", "images")]
    for i, mod in enumerate(vision_mods):
        written["vision" if i == 0 else f"vision-{mod}"] = export_vision(
            cfg, state, mod, out / ("vision" if i == 0 else f"vision-{mod}"), opts)
    if "audio" in cfg.model.modalities and cfg.model.audio.backbone_type == "whisper" and cfg.model.pretrained.get(
            "audio"):
        written["audio"] = export_audio(cfg, state, out / "audio", opts)
    written.update(export_projectors(cfg, state, out, opts))
    return written
