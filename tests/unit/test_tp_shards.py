"""Megatron's TP slicing rule: stride 2 gives each rank its own [gate_r; up_r]; unshard inverts shard."""

import pytest
import torch

from mimo_ray.parallel.tp_shards import shard, unshard


@pytest.mark.parametrize(("tp", "stride", "dim"), [(1, 1, 0), (2, 1, 0), (2, 2, 0), (4, 2, 0), (2, 1, 1)])
def test_shard_unshard_round_trip(tp, stride, dim):
    full = torch.arange(8 * 16, dtype=torch.float32).reshape(8 * (1 if dim else 2), -1)
    parts = [shard(full, tp, r, dim, stride) for r in range(tp)]
    assert all(p.shape[dim] == full.shape[dim] // tp for p in parts)
    assert torch.equal(unshard(parts, dim, stride), full)


def test_stride_two_is_gate_and_up_per_rank():
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    full = torch.cat([gate, up])
    assert torch.equal(shard(full, 2, 1, 0, 2), torch.cat([gate[4:], up[4:]]))
    assert torch.equal(shard(full, 2, 1, 0, 1), up)  # plain slicing would hand rank 1 only up rows
    with pytest.raises(ValueError, match="cannot be split into 4 ranks x stride 2"):
        shard(torch.zeros(12, 2), 4, 0, 0, 2)
