"""``jobs/convert.py import``: local Hugging Face directories → a run directory with a step-0 checkpoint.

    cfg, ckpt = import_run(lm="hf/vicuna", vision="hf/clip-l-336", audio="hf/whisper-base", output_dir="runs/x",
                           preset="llava-avlm-7b", overrides=["parallel.lm_tp=2"])

The config comes from the preset, then each ``config.json`` (architecture knobs and sizes), then the overrides. The
LM's tokenizer gets the modality tags as new special tokens (new embedding rows: the mean of the HF rows); the
vocabulary is padded for ``parallel.lm_tp``. Tensors are read one at a time (safetensors are memory-mapped) and every
LM tensor-parallel rank gets its own slice (SwiGLU ``linear_fc1`` with stride 2). The LM is written in the ``local``
layer layout unless ``lm_layout="te"`` (transformer-engine names); a model built with the other layout renames on load
(:func:`mimo_ray.parallel.layer_layout.match_module`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.config_cli import _build, _read_yaml, _set_dotted, config_to_dict, parse_overrides, save_config
from mimo_ray.convert.hf_config import audio_overrides, lm_overrides, lm_seq_limit, vision_overrides
from mimo_ray.convert.hf_dir import HFDir
from mimo_ray.convert.mapping import (
    Rule,
    check_shape,
    clip_rules,
    combine,
    find_prefix,
    lm_rules,
    lm_tp_layout,
    whisper_rules,
)
from mimo_ray.convert.tokenizer_files import prepare_tokenizer
from mimo_ray.model.layers import DTYPES
from mimo_ray.parallel import imported_layout as layout
from mimo_ray.parallel.layer_layout import LAYOUTS, LOCAL
from mimo_ray.parallel.tp_shards import shard

log = logging.getLogger("mimo_ray")

CLIP_PREFIXES = ("vision_model.", "", "model.vision_model.")
WHISPER_PREFIXES = ("model.encoder.", "encoder.", "")
LM_PREFIXES = ("model.", "")


def clip_prefix(src: HFDir) -> str:
    """Prefix of the vision tower's keys: ``vision_model.`` in hub files and CLIPModel, none in transformers 5's
    ``CLIPVisionModel.save_pretrained``.
    """
    return find_prefix(src.keys(), "embeddings.patch_embedding.weight", CLIP_PREFIXES, f"--vision {src.path}")


def whisper_prefix(src: HFDir) -> str:
    """Prefix of the Whisper encoder's keys."""
    return find_prefix(src.keys(), "conv1.weight", WHISPER_PREFIXES, f"--audio {src.path}")


def lm_prefix(src: HFDir) -> str:
    """Prefix of the LM decoder's keys (``model.`` for ``*ForCausalLM``)."""
    return find_prefix(src.keys(), "embed_tokens.weight", LM_PREFIXES, f"--lm {src.path}")


def read_rule(src: HFDir, rule: Rule, flag: str) -> torch.Tensor:
    """Our full fp32 tensor for ``rule`` from ``src``.

    Raises:
        ValueError: a HF key is missing or has another shape, naming the key, its shape and the expected one.
    """
    tensors: list[torch.Tensor | None] = []
    for key, want in zip(rule.hf, rule.hf_shapes, strict=True):
        if key is None:
            tensors.append(None)
            continue
        if key not in src:
            raise ValueError(f"{flag} {src.path}: HF key {key!r} (expected shape {list(want)}) is missing")
        tensor = src.get(key).float()
        try:
            check_shape(key, tensor, want, any_rows=rule.kind == "rows")
        except ValueError as err:
            raise ValueError(f"{flag} {src.path}: {err}") from None
        tensors.append(tensor)
    out = combine(rule, tensors)
    if rule.kind == "rows":
        rows = rule.meta["rows"]
        if out.shape[0] > rows and "embed_positions" in (rule.hf[0] or ""):
            out = out[:rows]
        elif out.shape[0] < rows and "embed_positions" in (rule.hf[0] or ""):
            raise ValueError(
                f"{flag} {src.path}: HF key {rule.hf[0]!r} has {out.shape[0]} positions, the configured audio clip "
                f"needs {rows} (model.audio.clip_seconds too long)"
            )
    return out


def grow_rows(table: torch.Tensor, rows: int, padded: int) -> torch.Tensor:
    """A vocabulary table with ``rows`` real rows (new ones: the mean of the HF rows) and zero padding to ``padded``.

    Raises:
        ValueError: the HF table has more rows than ``rows``.
    """
    have = table.shape[0]
    if have > rows:
        raise ValueError(f"the HF vocabulary has {have} rows, more than model.lm.vocab_size={rows}")
    out = torch.zeros(padded, table.shape[1], dtype=table.dtype)
    out[:have] = table
    if rows > have:
        out[have:rows] = table.mean(dim=0, keepdim=True)
    return out


def derive_config(preset: str, overrides: list[str], lm: HFDir | None, vision: HFDir | None, audio: HFDir | None,
                  output_dir: Path) -> tuple[Config, Any]:
    """Preset → HF configs → overrides → tokenizer facts → the validated config (and the tokenizer info)."""
    tree = _read_yaml(preset)
    derived: list[str] = []
    if vision is not None:
        derived += vision_overrides(vision.config, f"--vision {vision.path}/config.json")
    if audio is not None:
        derived += audio_overrides(audio.config, f"--audio {audio.path}/config.json")
    if lm is not None:
        derived += lm_overrides(lm.config, f"--lm {lm.path}/config.json")
    user = parse_overrides(list(overrides))
    if not any(dotted == "model.modalities" for dotted, _ in user):
        # The model has the modalities whose encoders were given (an LM alone is a text-only model): the preset's
        # vision modalities with --vision, audio with --audio.
        preset_mods = list((tree.get("model") or {}).get("modalities") or ["video", "audio"])
        mods = [m for m in preset_mods if (m in ("video", "images") and vision) or (m == "audio" and audio)]
        if vision is not None and not any(m in ("video", "images") for m in mods):
            mods.insert(0, "video")
        if audio is not None and "audio" not in mods:
            mods.append("audio")
        derived.append(f"model.modalities=[{','.join(mods)}]")
    for dotted, value in parse_overrides(derived) + user:
        _set_dotted(tree, dotted, value)
    info = None
    pretrained = {}
    if lm is not None:
        info = prepare_tokenizer(lm, output_dir / "tokenizer")
        hf_vocab = int(lm.config.get("vocab_size") or info.vocab_size)
        _set_dotted(tree, "model.lm.vocab_size", max(hf_vocab, info.vocab_size))
        _set_dotted(tree, "model.special_token_ids", {m: info.special_tokens[t] for m, t in
                                                      (("video", "<video>"), ("audio", "<audio>"),
                                                       ("images", "<image>"))})
        _set_dotted(tree, "data.tokenizer", str(info.tokenizer_json.resolve()))
        _set_dotted(tree, "data.chat_template", str(info.chat_template.resolve()))
        pretrained["lm"] = str(lm.path.resolve())
    if vision is not None:
        pretrained["vision"] = str(vision.path.resolve())
    if audio is not None:
        pretrained["audio"] = str(audio.path.resolve())
    _set_dotted(tree, "model.pretrained", pretrained)
    _set_dotted(tree, "train.output_dir", str(output_dir))
    cfg = _build(Config, tree)
    if lm is not None:
        limit = lm_seq_limit(lm.config)
        if limit is not None and cfg.model.lm.seq_length > limit:
            raise ValueError(
                f"model.lm.seq_length={cfg.model.lm.seq_length} exceeds the sliding window {limit} of --lm "
                f"{lm.path}; sliding-window attention is not supported"
            )
    return cfg, info


def _write_encoder(step: Path, src: HFDir, rules: list[Rule], part: str, flag: str, dtype: torch.dtype) -> int:
    state = {rule.ours: read_rule(src, rule, flag).to(dtype).contiguous() for rule in rules}
    path = layout.part_file(step, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return sum(t.numel() for t in state.values())


def _write_lm(step: Path, src: HFDir, cfg: Config, dtype: torch.dtype, lm_layout: str = LOCAL,
              ) -> tuple[int, dict[str, list[int]]]:
    lm = cfg.model.lm
    tp = cfg.parallel.lm_tp
    prefix = lm_prefix(src)
    hf_vocab = src.get(f"{prefix}embed_tokens.weight").shape[0]
    rules = lm_rules(cfg.model, prefix, hf_vocab, lm_layout)
    if lm.untie_embeddings_and_output_weights and "lm_head.weight" not in src:
        raise ValueError(f"--lm {src.path}: tie_word_embeddings is false but HF key 'lm_head.weight' is missing")
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    tp_layout: dict[str, list[int]] = {}
    count = 0
    padded = lm.padded_vocab_size(tp)
    for rule in rules:
        full = read_rule(src, rule, "--lm")
        if rule.kind == "rows":
            full = grow_rows(full, lm.vocab_size, padded)
        full = full.to(dtype)
        count += full.numel()
        where = lm_tp_layout(rule.ours, lm.swiglu)
        if where is not None:
            tp_layout[rule.ours] = list(where)
        for rank in range(tp):
            shards[rank][rule.ours] = (shard(full, tp, rank, *where) if where and tp > 1 else full).contiguous()
        del full
    for rank in range(tp):
        path = layout.part_file(step, layout.LM_PART, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(shards[rank], path)
        shards[rank] = {}
    return count, tp_layout


def import_run(lm: str | None, vision: str | None, audio: str | None, output_dir: str, preset: str = "tiny",
               overrides: list[str] | None = None, lm_layout: str = LOCAL) -> tuple[Config, Path]:
    """Import local HF directories into ``output_dir`` (config, tokenizer, ``checkpoints/step_0000000``).

    ``lm_layout`` names the LM's layer norms: ``local`` (``input_layernorm.weight``) or ``te`` (transformer-engine:
    ``self_attention.linear_qkv.layer_norm_weight``); either loads into a model of either layout.

    Returns:
        ``(config, checkpoint directory)``.

    Raises:
        ValueError: an unsupported or inconsistent directory, naming the flag, file, key and shapes at fault.
    """
    from mimo_ray.data.tokenizer import ChatTokenizer
    from mimo_ray.driver import checkpoint as ckpt

    if lm is None and vision is None and audio is None:
        raise ValueError("nothing to import: give --lm, --vision and/or --audio")
    if lm_layout not in LAYOUTS:
        raise ValueError(f"lm_layout={lm_layout!r} must be one of {', '.join(LAYOUTS)}")
    t0 = time.perf_counter()
    out = Path(output_dir)
    srcs = {
        "lm": HFDir(lm, "--lm") if lm else None,
        "vision": HFDir(vision, "--vision") if vision else None,
        "audio": HFDir(audio, "--audio") if audio else None,
    }
    cfg, _ = derive_config(preset, list(overrides or []), srcs["lm"], srcs["vision"], srcs["audio"], out)
    model = cfg.model
    dtype = DTYPES[model.params_dtype]
    ckpt_dir = out / "checkpoints"
    if ckpt.latest(ckpt_dir) is not None:
        raise ValueError(f"--output-dir {output_dir!r} already holds checkpoints; choose a new run directory")
    tmp = ckpt.begin(ckpt_dir, 0)  # renamed to step_0000000 once complete
    parts: list[str] = []
    counts: dict[str, int] = {}
    tp_layout: dict[str, list[int]] = {}
    if srcs["vision"] is not None:
        vis_mods = [m for m in model.modalities if m in ("video", "images")]
        if not vis_mods:
            raise ValueError(f"--vision given but model.modalities={model.modalities} has neither video nor images")
        prefix = clip_prefix(srcs["vision"])
        for mod in vis_mods:
            counts[mod] = _write_encoder(tmp, srcs["vision"], clip_rules(model, mod, prefix), mod, "--vision", dtype)
            parts.append(mod)
    if srcs["audio"] is not None:
        if "audio" not in model.modalities or model.audio.backbone_type != "whisper":
            raise ValueError("--audio needs 'audio' in model.modalities and model.audio.backbone_type=whisper")
        prefix = whisper_prefix(srcs["audio"])
        counts["audio"] = _write_encoder(tmp, srcs["audio"], whisper_rules(model, prefix), "audio", "--audio",
                                         dtype)
        parts.append("audio")
    if srcs["lm"] is not None:
        counts[layout.LM_PART], tp_layout = _write_lm(tmp, srcs["lm"], cfg, dtype, lm_layout)
        parts.append(layout.LM_PART)
    for src in srcs.values():
        if src is not None:
            src.close()
    layout.write_manifest(tmp, {"lm_tp": cfg.parallel.lm_tp, "parts": parts, "num_params": counts,
                                 "lm_tp_layout": tp_layout, "sources": dict(model.pretrained),
                                 "lm_layout": lm_layout if srcs["lm"] is not None else None})
    tok = ChatTokenizer.from_config(cfg).to_dict()
    state = {"step": 0, "samples_consumed": 0, "config": config_to_dict(cfg), "tokenizer": tok,
             "chat_template": tok["chat_template"], "special_token_ids": tok["special_tokens"],
             "imported_from": dict(model.pretrained)}
    ckpt.write_driver_state(tmp, state)
    save_config(cfg, tmp / "config.yaml")
    final = ckpt.commit(ckpt_dir, tmp, 0)
    save_config(cfg, out / "config.yaml")
    log.info("imported %s into %s in %.1f s", counts, final, time.perf_counter() - t0)
    return cfg, final
