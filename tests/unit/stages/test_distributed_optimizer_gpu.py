"""Megatron's distributed optimizer on CUDA (issue 22 item 5), the half a CPU cannot run: the tiny preset in bf16,
a few steps with ``train.optimizer_impl=megatron`` against ``torch`` (losses and the first grad norm within
:mod:`mimo_ray.perf.optimizer_check`'s tolerances), its bytes per parameter (2 + 4 + 12 / DP, bucket padding on the
first two), the global clip applied, and a checkpoint round trip of the optimizer shard.

Run: MIMO_RAY_TEST_DEVICE=cuda python -m pytest -q tests/unit/stages/test_distributed_optimizer_gpu.py
(collected and skipped on CPU).
"""

from __future__ import annotations

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.perf.optimizer_check import (
    LOSS_TOL_FIRST,
    LOSS_TOL_RUN,
    NORM_TOL_FIRST,
    compare_optimizers,
    run_impl,
    train_step,
)

pytestmark = pytest.mark.gpu

OVERRIDES = ["model.params_dtype=bf16", "model.attention_backend=sdpa", "train.runtime=fused",
             "data.micro_batch_size=2", "model.lm.seq_length=64"]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", OVERRIDES)


def test_megatron_steps_match_the_torch_optimizer(megatron_world, cfg):
    runs = compare_optimizers(cfg, steps=4, lr=1e-3)
    ref, meg = runs["torch"], runs["megatron"]
    assert _rel(meg.losses[0], ref.losses[0]) <= LOSS_TOL_FIRST
    assert max(_rel(a, b) for a, b in zip(meg.losses, ref.losses, strict=True)) <= LOSS_TOL_RUN
    assert _rel(meg.grad_norms[0], ref.grad_norms[0]) <= NORM_TOL_FIRST
    assert meg.losses[-1] < meg.losses[0]  # it trains
    # bf16 at DP=1: 2 weight + 4 fp32 grad bucket (both x padding) + 4 master + 8 moments; torch path 18.
    assert ref.bytes_per_param == pytest.approx(18.0)
    assert meg.bytes_per_param == pytest.approx(meg.expected_bytes_per_param, rel=1e-9)
    assert 18.0 <= meg.bytes_per_param <= 18.0 * 1.05


def test_megatron_stage_state_on_cuda(megatron_world, cfg):
    from mimo_ray.model.inputs import random_batch

    batches = [random_batch(cfg, 2, seed=300 + k) for k in range(2)]
    run, stage = run_impl(cfg, "megatron", batches, steps=1, lr=1e-3)
    assert stage.optimizer_impl == "megatron" and stage.device.type == "cuda"
    params = [p for p in stage.module.parameters() if p.requires_grad]
    assert {(p.device.type, p.dtype) for p in params} == {("cuda", torch.bfloat16)}
    assert {p.main_grad.dtype for p in params} == {torch.float32}
    masters = [m for g in stage.optimizer.inner.shard_fp32_from_float16_groups for m in g]
    assert masters and {m.dtype for m in masters} == {torch.float32}
    # The global clip: a tiny max norm makes the coefficient < 1 and the step still finite.
    stats = [stage.forward_backward(b) for b in batches]
    out = stage.optimizer_step(1e-3, 1e-3, stage.reduce_grads(*stats))
    assert out["clip_coef"] < 1.0 and out["skipped"] == 0
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_megatron_checkpoint_round_trip(megatron_world, cfg, tmp_path):
    from mimo_ray.model.inputs import random_batch

    batches = [random_batch(cfg, 2, seed=400 + k) for k in range(2)]
    _, stage = run_impl(cfg, "megatron", batches, steps=2, lr=1e-3)
    stage.save(str(tmp_path))
    assert (tmp_path / "fused" / "optim_tp0_dp0.pt").exists()
    _, fresh = run_impl(cfg, "megatron", batches, steps=0, lr=1e-3)
    fresh.load(str(tmp_path))
    saved, loaded = stage.optimizer.shard_state(), fresh.optimizer.shard_state()
    assert saved["shards"].keys() == loaded["shards"].keys()
    for name, tensors in saved["shards"].items():
        for key, value in tensors.items():
            got = loaded["shards"][name][key]
            assert (got == value) if key == "range" else torch.equal(got, value), (name, key)
    # Both continue identically: same weights, masters, moments and step counts.
    a, b = train_step(stage, batches, 1e-3), train_step(fresh, batches, 1e-3)
    assert a == pytest.approx(b, rel=1e-6)
    pa, pb = stage.full_parameters(), fresh.full_parameters()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
