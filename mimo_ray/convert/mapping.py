"""Key and layout rules between Hugging Face state dicts and mimo_ray's Megatron modules.

A :class:`Rule` says how one of our tensors is made from one or more HF tensors (and back):

- ``copy``: same tensor;
- ``qkv``: Megatron's fused ``linear_qkv`` rows are per query group ``[q heads of the group…, k_g, v_g]``; HF keeps
  ``q_proj`` / ``k_proj`` / ``v_proj`` apart (a missing HF bias, Whisper's ``k_proj``, is a zero slice);
- ``glu``: SwiGLU ``linear_fc1`` = ``cat([gate_proj; up_proj])``;
- ``class_token``: CLIP ``class_embedding [H]`` ↔ ``class_token [1, 1, H]``;
- ``rows``: a table whose first rows we keep (Whisper positions: the first ``ceil(T/2)`` of ``max_source_positions``;
  vocabularies: HF rows first, rows we add for new special tokens after them).

Keys are full names: ours as in the fused ``MimoRayModel`` state dict, HF's with the prefix found in the directory.
The LM's rules name our tensors in either layer layout (:mod:`mimo_ray.parallel.layer_layout`): ``local`` (separate
``input_layernorm`` / ``pre_mlp_layernorm``) or ``te`` (the norms fused into ``linear_qkv`` / ``linear_fc1`` as
``layer_norm_weight``); the HF side is the same for both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mimo_ray.config import ModelConfig
from mimo_ray.parallel.imported_layout import lm_tp_layout  # noqa: F401 - re-exported (importer, exporter, tests)
from mimo_ray.parallel.layer_layout import LOCAL, rename


@dataclass
class Rule:
    """One of our tensors ↔ HF tensors.

    Attributes:
        ours: our key (fused model name).
        hf: the HF keys it is made of; ``None`` entries are absent HF tensors (zero-filled, never exported).
        kind: ``copy``, ``qkv``, ``glu``, ``class_token`` or ``rows``.
        hf_shapes: the shape each HF tensor must have (``rows``: any row count, the rest must match).
        meta: ``qkv``: ``groups``, ``heads``, ``head_dim``; ``rows``: ``rows`` (ours).
    """

    ours: str
    hf: tuple[str | None, ...]
    kind: str
    hf_shapes: tuple[tuple[int, ...], ...]
    meta: dict = field(default_factory=dict)


def check_shape(key: str, tensor: torch.Tensor, want: tuple[int, ...], *, any_rows: bool = False) -> None:
    """Raise ``ValueError`` naming the HF key, its shape and the expected one when they differ."""
    have = tuple(tensor.shape)
    ok = have[1:] == want[1:] and len(have) == len(want) if any_rows else have == want
    if not ok:
        shown = ("N",) + want[1:] if any_rows else want
        raise ValueError(f"HF key {key!r} has shape {list(have)}, expected {list(shown)}")


def combine(rule: Rule, tensors: list[torch.Tensor | None]) -> torch.Tensor:
    """Our tensor from the rule's HF tensors (already shape-checked)."""
    if rule.kind == "copy":
        return tensors[0]
    if rule.kind == "class_token":
        return tensors[0].reshape(1, 1, -1)
    if rule.kind == "glu":
        return torch.cat(tensors, dim=0)
    if rule.kind == "rows":
        return tensors[0]
    if rule.kind == "qkv":
        groups, heads, hd = rule.meta["groups"], rule.meta["heads"], rule.meta["head_dim"]
        q, k, v = tensors
        like = q
        k = torch.zeros_like(like[: groups * hd]) if k is None else k
        v = torch.zeros_like(like[: groups * hd]) if v is None else v
        tail = q.shape[1:]
        parts = [
            q.reshape(groups, heads // groups * hd, *tail),
            k.reshape(groups, hd, *tail),
            v.reshape(groups, hd, *tail),
        ]
        return torch.cat(parts, dim=1).reshape(-1, *tail)
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def split(rule: Rule, ours: torch.Tensor) -> list[torch.Tensor | None]:
    """Inverse of :func:`combine`: the HF tensors (``None`` for absent ones) from our full tensor."""
    if rule.kind in ("copy", "rows"):
        return [ours]
    if rule.kind == "class_token":
        return [ours.reshape(-1)]
    if rule.kind == "glu":
        return list(torch.chunk(ours, 2, dim=0))
    if rule.kind == "qkv":
        groups, heads, hd = rule.meta["groups"], rule.meta["heads"], rule.meta["head_dim"]
        tail = ours.shape[1:]
        per = ours.reshape(groups, (heads // groups + 2) * hd, *tail)
        q, k, v = torch.split(per, [heads // groups * hd, hd, hd], dim=1)
        out = [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]
        return [t if key is not None else None for t, key in zip(out, rule.hf, strict=True)]
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def _attention(ours: str, hf: str, hidden: int, heads: int, groups: int, *, bias: tuple[bool, bool, bool],
               names: tuple[str, str, str, str], out_bias: bool) -> list[Rule]:
    hd = hidden // heads
    q, k, v, o = names
    meta = {"groups": groups, "heads": heads, "head_dim": hd}
    shapes = ((heads * hd, hidden), (groups * hd, hidden), (groups * hd, hidden))
    rules = [Rule(f"{ours}linear_qkv.weight", (f"{hf}{q}.weight", f"{hf}{k}.weight", f"{hf}{v}.weight"), "qkv",
                  shapes, meta)]
    if any(bias):
        keys = tuple(f"{hf}{n}.bias" if b else None for n, b in zip((q, k, v), bias, strict=True))
        rules.append(Rule(f"{ours}linear_qkv.bias", keys, "qkv", tuple((s[0],) for s in shapes), meta))
    rules.append(Rule(f"{ours}linear_proj.weight", (f"{hf}{o}.weight",), "copy", ((hidden, heads * hd),)))
    if out_bias:
        rules.append(Rule(f"{ours}linear_proj.bias", (f"{hf}{o}.bias",), "copy", ((hidden,),)))
    return rules


def _copy(ours: str, hf: str, shape: tuple[int, ...]) -> Rule:
    return Rule(ours, (hf,), "copy", (shape,))


def _norm(ours: str, hf: str, hidden: int, bias: bool = True) -> list[Rule]:
    rules = [_copy(f"{ours}.weight", f"{hf}.weight", (hidden,))]
    if bias:
        rules.append(_copy(f"{ours}.bias", f"{hf}.bias", (hidden,)))
    return rules


def _encoder_layer(ours: str, hf: str, hidden: int, heads: int, ffn: int, *, names: dict[str, str],
                   k_bias: bool) -> list[Rule]:
    rules = _norm(f"{ours}input_layernorm", f"{hf}{names['ln1']}", hidden)
    rules += _attention(f"{ours}self_attention.", f"{hf}{names['attn']}.", hidden, heads, heads,
                        bias=(True, k_bias, True), names=("q_proj", "k_proj", "v_proj", names["out"]), out_bias=True)
    rules += _norm(f"{ours}pre_mlp_layernorm", f"{hf}{names['ln2']}", hidden)
    rules += [
        _copy(f"{ours}mlp.linear_fc1.weight", f"{hf}{names['fc1']}.weight", (ffn, hidden)),
        _copy(f"{ours}mlp.linear_fc1.bias", f"{hf}{names['fc1']}.bias", (ffn,)),
        _copy(f"{ours}mlp.linear_fc2.weight", f"{hf}{names['fc2']}.weight", (hidden, ffn)),
        _copy(f"{ours}mlp.linear_fc2.bias", f"{hf}{names['fc2']}.bias", (hidden,)),
    ]
    return rules


CLIP_NAMES = {"ln1": "layer_norm1", "attn": "self_attn", "out": "out_proj", "ln2": "layer_norm2", "fc1": "mlp.fc1",
              "fc2": "mlp.fc2"}
WHISPER_NAMES = {"ln1": "self_attn_layer_norm", "attn": "self_attn", "out": "out_proj", "ln2": "final_layer_norm",
                 "fc1": "fc1", "fc2": "fc2"}


def clip_rules(model: ModelConfig, modality: str, hf_prefix: str) -> list[Rule]:
    """Our CLIP ViT of ``modality`` (``video`` / ``images``) ↔ HF ``CLIPVisionModel`` keys under ``hf_prefix``."""
    v = model.vision
    ours = f"modality_submodules.{modality}.encoders.clip.vit."
    h, grid = v.hidden_size, v.grid
    ffn = v.ffn_hidden_size or 4 * h
    rules = [
        Rule(f"{ours}class_token", (f"{hf_prefix}embeddings.class_embedding",), "class_token", ((h,),)),
        _copy(f"{ours}conv1.weight", f"{hf_prefix}embeddings.patch_embedding.weight", (h, 3, v.patch_dim, v.patch_dim)),
        _copy(f"{ours}position_embeddings.weight", f"{hf_prefix}embeddings.position_embedding.weight",
              (grid * grid + 1, h)),
        *_norm(f"{ours}ln_pre", f"{hf_prefix}pre_layrnorm", h),
    ]
    for i in range(v.built_layers):
        rules += _encoder_layer(f"{ours}decoder.layers.{i}.", f"{hf_prefix}encoder.layers.{i}.", h,
                                v.num_attention_heads, ffn, names=CLIP_NAMES, k_bias=True)
    return rules


def whisper_rules(model: ModelConfig, hf_prefix: str) -> list[Rule]:
    """Our Whisper encoder ↔ HF Whisper encoder keys under ``hf_prefix`` (``model.encoder.`` / ``encoder.``)."""
    a = model.audio
    ours = "modality_submodules.audio.encoders.whisper."
    h = a.hidden_size
    ffn = a.ffn_hidden_size or 4 * h
    positions = (a.num_input_frames - 1) // 2 + 1
    rules = [
        _copy(f"{ours}conv1.weight", f"{hf_prefix}conv1.weight", (h, a.n_mels, 3)),
        _copy(f"{ours}conv1.bias", f"{hf_prefix}conv1.bias", (h,)),
        _copy(f"{ours}conv2.weight", f"{hf_prefix}conv2.weight", (h, h, 3)),
        _copy(f"{ours}conv2.bias", f"{hf_prefix}conv2.bias", (h,)),
        Rule(f"{ours}positions", (f"{hf_prefix}embed_positions.weight",), "rows", ((positions, h),),
             {"rows": positions}),
    ]
    for i in range(a.num_layers):
        rules += _encoder_layer(f"{ours}block.layers.{i}.", f"{hf_prefix}layers.{i}.", h, a.num_attention_heads,
                                ffn, names=WHISPER_NAMES, k_bias=False)
    rules += _norm(f"{ours}block.final_layernorm", f"{hf_prefix}layer_norm", h)
    return rules


def lm_rules(model: ModelConfig, hf_prefix: str, hf_vocab: int, layout: str = LOCAL) -> list[Rule]:
    """Our GPTModel ↔ HF LLaMA / Mistral / Qwen2 keys (``hf_prefix``: ``model.`` for ``*ForCausalLM``).

    Args:
        model: the model config (``lm.vocab_size`` may exceed ``hf_vocab`` by added special tokens).
        hf_prefix: prefix of the decoder keys.
        hf_vocab: rows of the HF embedding table.
        layout: our layer layout, ``local`` or ``te`` (transformer-engine: ``input_layernorm.weight`` is
            ``self_attention.linear_qkv.layer_norm_weight``, ``pre_mlp_layernorm.weight`` is
            ``mlp.linear_fc1.layer_norm_weight``).

    Raises:
        ValueError: an unknown layout.
    """
    lm = model.lm
    h, heads = lm.hidden_size, lm.num_attention_heads
    groups = lm.num_query_groups or heads
    ffn = lm.ffn_hidden_size or 4 * h
    rows = {"rows": lm.vocab_size}
    rules = [Rule("language_model.embedding.word_embeddings.weight", (f"{hf_prefix}embed_tokens.weight",), "rows",
                  ((hf_vocab, h),), rows)]
    for i in range(lm.num_layers):
        ours, hf = f"language_model.decoder.layers.{i}.", f"{hf_prefix}layers.{i}."
        rules += _norm(f"{ours}input_layernorm", f"{hf}input_layernorm", h, bias=False)
        rules += _attention(f"{ours}self_attention.", f"{hf}self_attn.", h, heads, groups,
                            bias=(lm.qkv_bias,) * 3, names=("q_proj", "k_proj", "v_proj", "o_proj"), out_bias=False)
        rules += _norm(f"{ours}pre_mlp_layernorm", f"{hf}post_attention_layernorm", h, bias=False)
        rules.append(Rule(f"{ours}mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"),
                          "glu", ((ffn, h), (ffn, h))))
        rules.append(_copy(f"{ours}mlp.linear_fc2.weight", f"{hf}mlp.down_proj.weight", (h, ffn)))
    rules += _norm("language_model.decoder.final_layernorm", f"{hf_prefix}norm", h, bias=False)
    if lm.untie_embeddings_and_output_weights:
        rules.append(Rule("language_model.output_layer.weight", ("lm_head.weight",), "rows", ((hf_vocab, h),), rows))
    for rule in rules:
        rule.ours = rename(rule.ours, layout)
    return rules


def find_prefix(keys: set[str] | list[str], probe: str, prefixes: tuple[str, ...], where: str) -> str:
    """The first of ``prefixes`` under which ``probe`` exists.

    Raises:
        ValueError: naming the directory and the keys that were looked for.
    """
    keys = set(keys)
    for prefix in prefixes:
        if prefix + probe in keys:
            return prefix
    tried = ", ".join(repr(p + probe) for p in prefixes)
    raise ValueError(f"{where}: none of the keys {tried} exists; not a supported layout")
