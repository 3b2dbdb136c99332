"""Tensor-parallel resharding of a stage checkpoint: shards written by TP=a ranks, loaded by a TP=b rank.

Megatron's layouts: column-parallel weights (and their biases) split on dim 0, row-parallel weights on dim 1,
vocab-parallel embedding and output layer on dim 0; replicated tensors (norms, row-parallel biases, position
embeddings) are equal on every rank. SwiGLU's ``linear_fc1`` has partition stride 2: TP rank ``r`` holds
``[gate_r; up_r]``, so the full tensor is ``[gate; up]`` = ``[gate_0; …; gate_{a-1}; up_0; …; up_{a-1}]``.

    layouts = tp_layouts(module.named_parameters(), swiglu=cfg.model.lm.swiglu)
    model = reshard_model([torch.load(f)["model"] for f in files], layouts, tp=1, rank=0)
    optim = reshard_optimizer([... ["optimizer"]], param_names, layouts, tp=1, rank=0)

Optimizer state tensors shaped like their parameter's shard (AdamW ``exp_avg`` / ``exp_avg_sq``, master weights)
are resharded like the parameter; everything else (``step``, hyper-parameters) is taken from TP rank 0.

``torch.distributed.checkpoint`` is not used: it reshards DTensor/ShardedTensor state with even, contiguous chunks
along one dim, but Megatron's local modules hold plain tensors, and SwiGLU's strided fc1 is not one contiguous chunk
per rank (Megatron's own dist-checkpointing needs a special factory for it). Converting every stage to DTensors would
change the checkpoint format that recovery, inference and the HF import read.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

#: Parameter names (suffixes) of the SwiGLU fc1, whose TP shards are ``[gate_r; up_r]``.
SWIGLU_FC1 = ("mlp.linear_fc1.weight", "mlp.linear_fc1.bias")


@dataclass(frozen=True)
class ShardLayout:
    """How a TP-sharded tensor is split: along ``dim``, in ``stride`` interleaved parts per rank."""

    dim: int
    stride: int = 1


def tp_layouts(named_params: Iterable[tuple[str, torch.Tensor]], swiglu: bool) -> dict[str, ShardLayout | None]:
    """Layout of every parameter from Megatron's attributes (``None``: replicated on every TP rank).

    Args:
        named_params: the module's ``named_parameters()`` (any TP size: the attributes do not depend on it).
        swiglu: the LM uses SwiGLU (its fc1 shards have stride 2; Megatron leaves ``partition_stride`` at 1).
    """
    out: dict[str, ShardLayout | None] = {}
    for name, p in named_params:
        if not getattr(p, "tensor_model_parallel", False):
            out[name] = None
            continue
        stride = int(getattr(p, "partition_stride", 1))
        if swiglu and name.endswith(SWIGLU_FC1):
            stride = 2
        out[name] = ShardLayout(int(p.partition_dim), stride)
    return out


def merge(shards: list[torch.Tensor], layout: ShardLayout) -> torch.Tensor:
    """The full tensor from every TP rank's shard, in rank order."""
    if layout.stride == 1:
        return torch.cat(shards, dim=layout.dim)
    parts = [shard.chunk(layout.stride, dim=layout.dim) for shard in shards]
    return torch.cat([torch.cat([p[j] for p in parts], dim=layout.dim) for j in range(layout.stride)], dim=layout.dim)


def split(full: torch.Tensor, layout: ShardLayout, tp: int, rank: int, name: str = "") -> torch.Tensor:
    """TP rank ``rank``'s shard of ``full`` for ``tp`` ranks.

    Raises:
        ValueError: the split dim does not divide evenly (naming the tensor).
    """
    size = full.shape[layout.dim]
    if size % (tp * layout.stride):
        raise ValueError(f"{name}: dim {layout.dim} of size {size} does not split into {tp} TP x {layout.stride} parts")
    parts = full.chunk(layout.stride, dim=layout.dim)
    return torch.cat([p.chunk(tp, dim=layout.dim)[rank] for p in parts], dim=layout.dim).clone()


def _reshard(values: list[torch.Tensor], layout: ShardLayout | None, tp: int, rank: int, name: str) -> torch.Tensor:
    if layout is None:
        return values[0]
    return split(merge(values, layout), layout, tp, rank, name)


def reshard_model(
    states: list[dict[str, torch.Tensor]], layouts: dict[str, ShardLayout | None], tp: int, rank: int
) -> dict[str, torch.Tensor]:
    """Rank ``rank`` of ``tp``'s model state from the state of every rank of another TP size.

    Args:
        states: each old TP rank's ``state_dict`` tensors, in rank order.
        layouts: :func:`tp_layouts` (tensors not named there, e.g. buffers, are replicated).
        tp: the new TP size.
        rank: the new TP rank.

    Raises:
        ValueError: the old ranks disagree on the keys (naming the first rank that differs).
    """
    keys = list(states[0])
    for r, state in enumerate(states[1:], start=1):
        if set(state) != set(keys):
            raise ValueError(f"TP rank {r}'s checkpoint has keys {sorted(set(state) ^ set(keys))[:5]} unlike rank 0")
    return {k: _reshard([s[k] for s in states], layouts.get(k), tp, rank, k) for k in keys}


def reshard_optimizer(
    states: list[dict[str, Any]], param_names: list[str], layouts: dict[str, ShardLayout | None], tp: int, rank: int
) -> dict[str, Any]:
    """Rank ``rank`` of ``tp``'s ``optimizer.state_dict()`` from every old TP rank's.

    Args:
        states: each old TP rank's optimizer ``state_dict()``, in rank order (same parameter order on every rank).
        param_names: the optimizer's parameters by index (``state_dict()["state"]`` keys).
        layouts: :func:`tp_layouts`.
        tp: the new TP size.
        rank: the new TP rank.
    """
    if not states[0]:
        return states[0]
    out_state: dict[Any, dict[str, Any]] = {}
    for idx, entry in states[0]["state"].items():
        name = param_names[int(idx)]
        layout = layouts.get(name)
        new_entry = {}
        for key, value in entry.items():
            values = [s["state"][idx][key] for s in states]
            shaped = isinstance(value, torch.Tensor) and value.dim() > 0
            new_entry[key] = _reshard(values, layout if shaped else None, tp, rank, f"{name}:{key}")
        out_state[idx] = new_entry
    out = {**states[0], "state": out_state}  # param_groups, param_names, the fp16 loss scaler: the same on every rank
    if states[0].get("master_weights"):  # fp32 masters of low-precision parameters are split like their parameter
        out["master_weights"] = {
            idx: _reshard([s["master_weights"][idx] for s in states], layouts.get(param_names[int(idx)]), tp, rank,
                          f"{param_names[int(idx)]}:master")  # fmt: skip
            for idx in states[0]["master_weights"]
        }
    return out
