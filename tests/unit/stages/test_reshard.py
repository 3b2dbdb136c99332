"""TP resharding of checkpoint tensors: Megatron's layouts (dim 0 / dim 1, SwiGLU fc1 with stride 2)."""

import pytest
import torch

from mimo_ray.stages.reshard import ShardLayout, merge, reshard_model, reshard_optimizer, split


def _swiglu_shards(gate: torch.Tensor, up: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """What Megatron's TP ranks hold for a SwiGLU fc1: rank r has [gate_r; up_r]."""
    return [torch.cat([g, u]) for g, u in zip(gate.chunk(tp), up.chunk(tp), strict=True)]


def test_merge_and_split_follow_megatron_layouts():
    full = torch.arange(48.0).reshape(8, 6)
    col, row = ShardLayout(0), ShardLayout(1)
    assert torch.equal(merge(list(full.chunk(2, 0)), col), full)
    assert torch.equal(merge(list(full.chunk(2, 1)), row), full)
    assert torch.equal(split(full, row, 2, 1), full[:, 3:])
    gate, up = torch.randn(8, 3), torch.randn(8, 3)
    fc1 = ShardLayout(0, stride=2)
    two = _swiglu_shards(gate, up, 2)
    assert torch.equal(merge(two, fc1), torch.cat([gate, up]))
    # TP 2 -> 4 and back: every rank holds its own gate and up rows.
    four = [split(merge(two, fc1), fc1, 4, r) for r in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(four, _swiglu_shards(gate, up, 4), strict=True))
    assert torch.equal(merge(four, fc1), torch.cat([gate, up]))
    with pytest.raises(ValueError, match=r"w: dim 0 of size 16 does not split into 3 TP x 2 parts"):
        split(torch.cat([gate, up]), fc1, 3, 0, "w")


def test_model_and_adamw_state_reshard_like_their_parameters():
    w, norm = torch.randn(4, 6), torch.randn(6)
    layouts = {"w": ShardLayout(1), "norm": None}
    old = [{"w": s, "norm": norm} for s in w.chunk(2, 1)]
    assert torch.equal(reshard_model(old, layouts, 1, 0)["w"], w)
    avg, sq = torch.randn(4, 6), torch.rand(4, 6)
    opt = [
        {"state": {0: {"step": torch.tensor(3.0), "exp_avg": a, "exp_avg_sq": q}, 1: {"step": torch.tensor(3.0),
         "exp_avg": norm, "exp_avg_sq": norm}}, "param_groups": [{"params": [0, 1], "lr": 1e-3}]}
        for a, q in zip(avg.chunk(2, 1), sq.chunk(2, 1), strict=True)
    ]  # fmt: skip
    new = reshard_optimizer(opt, ["w", "norm"], layouts, 1, 0)
    assert torch.equal(new["state"][0]["exp_avg"], avg) and torch.equal(new["state"][0]["exp_avg_sq"], sq)
    assert new["state"][0]["step"].item() == 3.0 and torch.equal(new["state"][1]["exp_avg"], norm)
    assert new["param_groups"] == opt[0]["param_groups"]
    with pytest.raises(ValueError, match=r"TP rank 1's checkpoint has keys \['extra'\] unlike rank 0"):
        reshard_model([old[0], {**old[1], "extra": norm}], layouts, 1, 0)
