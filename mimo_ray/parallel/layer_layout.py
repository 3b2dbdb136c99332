"""Parameter names of a Megatron ``TransformerLayer`` in its two layouts, and renaming between them.

- ``local`` (Megatron's local / our SDPA specs): separate norm modules ``input_layernorm`` and ``pre_mlp_layernorm``;
- ``te`` (``get_gpt_layer_with_transformer_engine_spec``): both norms are ``IdentityOp`` and transformer-engine's
  ``LayerNormLinear`` (Megatron's ``TELayerNormColumnParallelLinear``) holds them as ``layer_norm_weight`` /
  ``layer_norm_bias`` of the linear that follows: ``self_attention.linear_qkv`` and ``mlp.linear_fc1``. Every TE
  module also has an ``_extra_state`` entry (fp8 metadata).

Everything else (linear weights and biases, embeddings, the final norm, the output layer) has the same name and
shape in both. The norm tensors are replicated under tensor parallelism in both layouts, so TP slices of one
layout are TP slices of the other after renaming.

Layouts are per *stack* (the key prefix before ``layers.<i>.``: ``language_model.decoder.``,
``modality_submodules.video.encoders.clip.vit.decoder.``, ...): with ``model.transformer_impl`` the LM may be TE
while the encoders stay local, so a fused model mixes layouts across stacks, never within one.

    state = to_layout(state, "te")                    # local names → TE names (``_extra_state`` entries dropped)
    state = match_module(state, module.state_dict())  # each stack in the layout the module built it with
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

LOCAL = "local"
TE = "te"
LAYOUTS = (LOCAL, TE)

#: Inside one transformer layer: local name → TE name.
LOCAL_TO_TE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "input_layernorm.bias": "self_attention.linear_qkv.layer_norm_bias",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
    "pre_mlp_layernorm.bias": "mlp.linear_fc1.layer_norm_bias",
}
TE_TO_LOCAL = {te: local for local, te in LOCAL_TO_TE.items()}

_IN_LAYER = re.compile(r"^(?P<stack>(?:.*\.)?)(?P<index>layers\.\d+\.)(?P<rest>.+)$")
EXTRA_STATE = "_extra_state"

V = TypeVar("V")


def _check(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layer layout {layout!r} is not one of {', '.join(LAYOUTS)}")


def rename(key: str, layout: str) -> str:
    """``key`` under ``layout``'s name (unchanged when it is the same in both layouts).

    Args:
        key: a state-dict key, any prefix (``language_model.decoder.layers.3.input_layernorm.weight``).
        layout: ``local`` or ``te``.

    Raises:
        ValueError: an unknown layout.
    """
    _check(layout)
    match = _IN_LAYER.match(key)
    if match is None:
        return key
    table = LOCAL_TO_TE if layout == TE else TE_TO_LOCAL
    rest = match["rest"]
    return match["stack"] + match["index"] + table.get(rest, rest)


def stack_layouts(keys: Iterable[str]) -> dict[str, str]:
    """``{stack prefix: layout}`` for every stack whose keys hold layer norms (``te`` when fused into the linears,
    ``local`` when separate).

    Raises:
        ValueError: one stack holds keys of both layouts (naming it).
    """
    found: dict[str, set[str]] = {}
    for key in keys:
        match = _IN_LAYER.match(key)
        if match is None:
            continue
        if match["rest"] in LOCAL_TO_TE:
            found.setdefault(match["stack"], set()).add(LOCAL)
        elif match["rest"] in TE_TO_LOCAL:
            found.setdefault(match["stack"], set()).add(TE)
    mixed = sorted(stack for stack, kinds in found.items() if len(kinds) > 1)
    if mixed:
        raise ValueError(f"the layers under {mixed[0]!r} mix the local and the transformer-engine layer layouts")
    return {stack: kinds.pop() for stack, kinds in found.items()}


def layout_of(keys: Iterable[str]) -> str | None:
    """The one layout of ``keys`` (``None`` when they hold no layer norms, nothing to rename).

    Raises:
        ValueError: ``keys`` mix both layouts (in one stack or across stacks).
    """
    kinds = set(stack_layouts(keys).values())
    if len(kinds) > 1:
        raise ValueError("state dict mixes the local and the transformer-engine layer layouts")
    return kinds.pop() if kinds else None


def _targets(keys: list[str], want: Callable[[str], str | None]) -> list[str | None]:
    """Per key: the layout to rename it to, ``None`` to keep it (its stack already has that layout or none)."""
    have = stack_layouts(keys)
    out: list[str | None] = []
    for key in keys:
        match = _IN_LAYER.match(key)
        target = want(match["stack"]) if match else None
        out.append(None if target is None or have.get(match["stack"]) in (None, target) else target)
    return out


def _convert(state: Mapping[str, V], want: Callable[[str], str | None]) -> dict[str, V]:
    out: dict[str, V] = {}
    for (key, value), target in zip(state.items(), _targets(list(state), want), strict=True):
        if target is None:
            out[key] = value
        elif not key.endswith(EXTRA_STATE):  # TE's fp8 metadata means nothing to the other layout (local: None)
            out[rename(key, target)] = value
    return out


def to_layout(state: Mapping[str, V], layout: str) -> dict[str, V]:
    """``state`` with every layer key under ``layout``'s name; in each stack that this renames, the layers'
    ``_extra_state`` entries are dropped.

    Raises:
        ValueError: an unknown layout, or a stack of ``state`` mixes both layouts.
    """
    _check(layout)
    return _convert(state, lambda stack: layout)


def match_module(state: Mapping[str, V], module_keys: Iterable[str]) -> dict[str, V]:
    """``state`` with each stack in the layout the module (its ``state_dict()`` keys) built that stack with: a
    checkpoint written with one layout loads into a model built with the other. Stacks without layer norms on
    either side are left as they are.
    """
    want = stack_layouts(module_keys)
    return _convert(state, want.get)


def rename_all(names: Iterable[str], like: Iterable[str]) -> list[str]:
    """Names (e.g. an optimizer's ``param_names``) with each stack in the layout of ``like`` (the module's names)."""
    names = list(names)
    targets = _targets(names, stack_layouts(like).get)
    return [name if target is None else rename(name, target) for name, target in zip(names, targets, strict=True)]
