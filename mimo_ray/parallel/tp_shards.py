"""Megatron's tensor-parallel slicing rule, as pure tensor functions (checkpoint import/export and TP gathers).

A parameter split along ``dim`` with partition stride ``s`` over ``tp`` ranks is cut into ``tp * s`` equal chunks;
rank ``r`` holds chunks ``r, r + tp, …`` concatenated. ``s = 2`` is the SwiGLU ``linear_fc1`` (``[gate; up]``): each
rank holds its own ``[gate_r; up_r]``, so plain slicing would hand rank 0 only gate rows.

    local = shard(full, tp=2, rank=1, dim=0, stride=2)
    assert torch.equal(unshard([shard(full, 2, r, 0, 2) for r in range(2)], dim=0, stride=2), full)
"""

from __future__ import annotations

import torch


def shard(full: torch.Tensor, tp: int, rank: int, dim: int, stride: int = 1) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full``.

    Args:
        full: the whole tensor.
        tp: tensor-parallel size.
        rank: tensor-parallel rank.
        dim: partition dimension.
        stride: partition stride (2 for SwiGLU ``linear_fc1``).

    Returns:
        A contiguous tensor with ``full.shape[dim] // tp`` rows along ``dim``.

    Raises:
        ValueError: ``full.shape[dim]`` is not divisible by ``tp * stride``.
    """
    size = full.shape[dim]
    if size % (tp * stride):
        raise ValueError(f"dimension {dim} of size {size} cannot be split into {tp} ranks x stride {stride}")
    chunks = torch.split(full, size // (tp * stride), dim=dim)
    return torch.cat(chunks[rank::tp], dim=dim).contiguous()


def unshard(parts: list[torch.Tensor], dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the whole tensor from every rank's slice, in rank order."""
    if stride == 1:
        return torch.cat(parts, dim=dim)
    pieces = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([pieces[r][k] for k in range(stride) for r in range(len(parts))], dim=dim)
