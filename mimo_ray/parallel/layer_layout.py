"""Parameter names of a Megatron ``TransformerLayer`` in its two layouts, and renaming between them.

- ``local`` (Megatron's local / our SDPA specs): separate norm modules ``input_layernorm`` and ``pre_mlp_layernorm``;
- ``te`` (``get_gpt_layer_with_transformer_engine_spec``): both norms are ``IdentityOp`` and transformer-engine's
  ``LayerNormLinear`` (Megatron's ``TELayerNormColumnParallelLinear``) holds them as ``layer_norm_weight`` /
  ``layer_norm_bias`` of the linear that follows: ``self_attention.linear_qkv`` and ``mlp.linear_fc1``. Every TE
  module also has an ``_extra_state`` entry (fp8 metadata).

Everything else (linear weights and biases, embeddings, the final norm, the output layer) has the same name and
shape in both. The norm tensors are replicated under tensor parallelism in both layouts, so TP slices of one
layout are TP slices of the other after renaming.

    state = to_layout(state, "te")                    # local names → TE names (``_extra_state`` entries dropped)
    state = match_module(state, module.state_dict())  # whatever layout the module was built with
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
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

_IN_LAYER = re.compile(r"^(?P<layer>(?:.*\.)?layers\.\d+\.)(?P<rest>.+)$")
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
    return match["layer"] + table.get(rest, rest)


def layout_of(keys: Iterable[str]) -> str | None:
    """``te`` when a key holds a fused layer norm, ``local`` when a key is a separate layer norm, ``None`` when the
    keys have no transformer-layer norms at all (nothing to rename).

    Raises:
        ValueError: keys of both layouts (a state dict mixing them cannot be loaded anywhere).
    """
    found = set()
    for key in keys:
        match = _IN_LAYER.match(key)
        if match is None:
            continue
        if match["rest"] in LOCAL_TO_TE:
            found.add(LOCAL)
        elif match["rest"] in TE_TO_LOCAL:
            found.add(TE)
    if len(found) > 1:
        raise ValueError("state dict mixes the local and the transformer-engine layer layouts")
    return found.pop() if found else None


def to_layout(state: Mapping[str, V], layout: str) -> dict[str, V]:
    """``state`` with every key under ``layout``'s name; when that renames anything, layer ``_extra_state`` entries
    are dropped (TE's fp8 metadata has no meaning in the other layout, local ones are ``None``).

    Raises:
        ValueError: an unknown layout, or ``state`` mixes both layouts.
    """
    _check(layout)
    have = layout_of(state)
    if have is None or have == layout:
        return dict(state)
    return {rename(k, layout): v for k, v in state.items() if not k.endswith(EXTRA_STATE)}


def match_module(state: Mapping[str, V], module_keys: Iterable[str]) -> dict[str, V]:
    """``state`` in the layout of a module with ``module_keys`` (its ``state_dict()`` keys): a checkpoint written
    with one layout loads into a model built with the other. Unchanged when either side has no layer norms.
    """
    want = layout_of(module_keys)
    return to_layout(state, want) if want is not None else dict(state)


def rename_all(names: Iterable[str], like: Iterable[str]) -> list[str]:
    """Names (e.g. an optimizer's ``param_names``) in the layout of ``like`` (the module's names)."""
    names = list(names)
    want = layout_of(like)
    if want is None or layout_of(names) in (None, want):
        return names
    return [rename(n, want) for n in names]
