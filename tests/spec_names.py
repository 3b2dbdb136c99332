"""Parameter names a Megatron layer ``ModuleSpec`` will create, read from the spec tree alone (nothing is built), and
Megatron's transformer-engine GPT layer spec built on a machine without transformer-engine.

Megatron 0.16.1 imports ``megatron.core.extensions.transformer_engine`` without TE too: its TE classes are then
``MagicMock`` placeholders, which are never instantiated here. ``get_gpt_layer_with_transformer_engine_spec`` only
lacks the ``TESpecProvider`` name (imported under ``HAVE_TE``) and a TE version to compare with, so
:func:`te_spec_without_te` supplies the real provider class and a version check that passes: the spec tree that
results is the one a TE machine builds, with the same TE classes in the same fields.

Which parameters each leaf class registers is transformer-engine's / Megatron's naming (see ``LEAF_PARAMS``):
TE's ``LayerNormLinear`` (``TELayerNormColumnParallelLinear``) registers ``layer_norm_weight``, ``layer_norm_bias``
(not for RMSNorm), ``weight`` and ``bias`` (only with a bias); TE's ``Linear`` and Megatron's parallel linears
``weight`` and ``bias``; norms ``weight`` and ``bias`` (not for RMSNorm); attention cores, identities and
bias-dropout-add functions none.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any
from unittest import mock

from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.identity_op import IdentityFuncOp, IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from mimo_ray.model.attention import SDPAttention


@contextlib.contextmanager
def te_spec_without_te() -> Iterator[None]:
    """Within the block, ``get_gpt_layer_with_transformer_engine_spec()`` works without transformer-engine."""
    import megatron.core.extensions.transformer_engine_spec_provider as provider
    import megatron.core.models.gpt.gpt_layer_specs as gpt_specs

    with (
        mock.patch.object(gpt_specs, "TESpecProvider", provider.TESpecProvider, create=True),
        mock.patch.object(provider, "is_te_min_version", lambda *args, **kwargs: True),
    ):
        yield


def _norm(cfg: TransformerConfig) -> list[str]:
    return ["weight", "bias"] if cfg.normalization == "LayerNorm" else ["weight"]


def _linear(bias: bool) -> list[str]:
    return ["weight", "bias"] if bias else ["weight"]


def leaf_params(leaf: Any, field: str, cfg: TransformerConfig) -> list[str]:
    """Parameter names (relative) of one leaf of a layer spec in the field ``field`` (``self_attention.linear_qkv``).

    Raises:
        ValueError: a leaf class this table does not know (so a new Megatron spec cannot pass unnoticed).
    """
    bias = cfg.add_bias_linear or (field.endswith("linear_qkv") and cfg.add_qkv_bias)
    if leaf is te_ext.TELayerNormColumnParallelLinear:
        return [f"layer_norm_{n}" for n in _norm(cfg)] + _linear(bias)
    if any(leaf is cls for cls in (te_ext.TEColumnParallelLinear, te_ext.TERowParallelLinear, ColumnParallelLinear,
                                   RowParallelLinear)):
        return _linear(bias)
    if any(leaf is cls for cls in (te_ext.TENorm, WrappedTorchNorm)):
        return _norm(cfg)
    if any(leaf is cls for cls in (te_ext.TEDotProductAttention, DotProductAttention, SDPAttention, IdentityOp,
                                   IdentityFuncOp)) or leaf is None:
        return []
    if isinstance(leaf, type) or isinstance(leaf, mock.Mock):
        raise ValueError(f"spec field {field!r} holds {leaf!r}, whose parameters this table does not know")
    return []  # a function (bias-dropout-add, activation)


def spec_param_names(spec: Any, cfg: TransformerConfig, prefix: str = "") -> list[str]:
    """Every parameter name a layer spec creates, in field order (``self_attention.linear_qkv.weight``, ...)."""
    if isinstance(spec, ModuleSpec):
        if spec.submodules is None:
            return [prefix + n for n in leaf_params(spec.module, prefix.rstrip("."), cfg)]
        names = []
        for f in dataclasses.fields(spec.submodules):
            if f.name == "sharded_state_dict_keys_map":
                continue
            names += spec_param_names(getattr(spec.submodules, f.name), cfg, f"{prefix}{f.name}.")
        return names
    return [prefix + n for n in leaf_params(spec, prefix.rstrip("."), cfg)]
