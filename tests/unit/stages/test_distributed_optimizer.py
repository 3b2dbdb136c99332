"""Megatron's distributed optimizer (issue 22 item 5), everything a CPU can check: megatron-core 0.16.1's
``DistributedDataParallel`` builds on CPU/gloo, ``DistributedOptimizer`` does not (the exact error is asserted), the
bucket layout of the tiny LM, Megatron's DP shard ranges for DP = 1, 2, 4 (every element owned exactly once), the
grad-norm share of the shards (sums to the unsharded norm), and the ``train.optimizer_impl`` config / resume rules.
The GPU half (steps against the torch optimizer, bytes per parameter, checkpoint round trip) is
``test_distributed_optimizer_gpu.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math

import pytest
import torch

from mimo_ray.config_cli import config_to_dict, load_config
from mimo_ray.driver.resume_rules import check_resume_config
from mimo_ray.model import build_lm_part
from mimo_ray.model.inputs import random_batch
from mimo_ray.stages import FusedStage
from mimo_ray.stages.megatron_optim import (
    BUCKET_GROUP_ATTRS,
    MEGATRON_INTERNALS,
    bucket_layout,
    ddp_config,
    resolve_impl,
    shard_ranges,
    shard_sq_norm,
    transformer_config_of,
)
from mimo_ray.stages.optim import grad_sq_norm
from mimo_ray.stages.precision import MixedPrecisionOptimizer, cast_module

BUCKET = 20_000  # elements: the tiny LM (~125k trainable parameters) gets several buckets


class _RankView:
    """A process group as the shard arithmetic sees it: a rank and a size (DP > 1 without spawning processes)."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def _lm(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    cfg = load_config("tiny", ["model.modalities=[]", "model.lm.seq_length=32"])
    torch.manual_seed(0)
    return cast_module(build_lm_part(cfg), dtype), cfg


def _ddp(module: torch.nn.Module, cfg):
    from megatron.core.distributed import DistributedDataParallel

    train = dataclasses.replace(cfg.train, grad_bucket_size=BUCKET)
    return DistributedDataParallel(transformer_config_of(module), ddp_config(train), module)


def _buffer(module: torch.nn.Module, dp: int):
    """A ``_ParamAndGradBuffer`` of ``module``'s trainable parameters laid out for ``dp`` data-parallel ranks."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.process_groups_config import ProcessGroupCollection

    params = [p for p in module.parameters() if p.requires_grad]
    names = {p: n for n, p in module.named_parameters()}
    groups = ProcessGroupCollection()
    groups.tp = parallel_state.get_tensor_model_parallel_group()
    groups.dp_cp = parallel_state.get_data_parallel_group()
    config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                           use_distributed_optimizer=True, bucket_size=BUCKET)
    return _ParamAndGradBuffer(config, params[0].dtype, torch.float32, params, _RankView(0, dp), BUCKET, names,
                               1.0, list(range(len(params))), False, groups), names


def _rank_ranges(buffer, rank: int, dp: int):
    """Megatron's own range map (``DistributedOptimizer._build_gbuf_range_map``) as DP rank ``rank`` sees it."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    view = copy.copy(buffer)
    view.data_parallel_group = _RankView(rank, dp)
    return shard_ranges([DistributedOptimizer._build_gbuf_range_map(view)])


def test_megatron_internals_exist(megatron_world):
    for owner, attr in MEGATRON_INTERNALS:
        module, _, cls = owner.rpartition(".")
        assert hasattr(getattr(importlib.import_module(module), cls), attr), f"{owner}.{attr} moved"


def test_ddp_builds_on_cpu_but_the_distributed_optimizer_needs_cuda(megatron_world):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    module, cfg = _lm()
    ddp = _ddp(module, cfg)
    assert all(b.grad_data.device.type == "cpu" and b.grad_data.dtype == torch.float32 for b in ddp.buffers)
    for group in ddp.bucket_groups:
        assert all(hasattr(group, attr) for attr in BUCKET_GROUP_ATTRS)
    with pytest.raises(AssertionError, match="Torch not compiled with CUDA enabled"):
        get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, use_distributed_optimizer=True), [ddp],
                               config_overrides={})


def test_ddp_hooks_accumulate_fp32_main_grads_on_cpu(megatron_world):
    # Two identical fp32 LMs: plain autograd vs DDP's hooks (grad -> main_grad view of the bucket, .grad dropped).
    ref, cfg = _lm()
    module, _ = _lm()
    ddp = _ddp(module, cfg)
    batches = [random_batch(load_config("tiny", ["model.modalities=[]", "model.lm.seq_length=32"]), 2, seed=s)
               for s in (1, 2)]
    for batch in batches:  # two micro-batches accumulate
        for model in (ref, module):
            loss = model.forward_lm(batch["input_ids"], batch["position_ids"], {}, batch["labels"])
            (loss * batch["loss_mask"]).sum().backward()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), module.named_parameters(), strict=True):
        assert p.grad is None, name
        assert torch.equal(p.main_grad, p_ref.grad), name
    ddp.start_grad_sync()  # DP = 1 on gloo: the reduce-scatter is an identity
    ddp.finish_grad_sync()
    for (name, p_ref), (_, p) in zip(ref.named_parameters(), module.named_parameters(), strict=True):
        assert torch.equal(p.main_grad, p_ref.grad), name


def test_bucket_layout_of_the_tiny_lm(megatron_world):
    module, cfg = _lm(torch.bfloat16)
    order = [n for n, p in module.named_parameters() if p.requires_grad]
    ddp = _ddp(module, cfg)
    (buffer,) = ddp.buffers
    names = {p: n for n, p in module.named_parameters()}
    layout = bucket_layout(ddp.buffers, names)
    assert len(layout) >= 3
    # Parameters fill buckets in reverse registration order (roughly backprop order), each in exactly one bucket.
    assert [n for row in layout for n in row["params"]] == order[::-1]
    sizes = {n: p.numel() for n, p in module.named_parameters()}
    offset = 0
    for i, row in enumerate(layout):
        assert row["offset"] == offset
        assert row["padded"] % 128 == 0 and row["padded"] >= row["numel"]  # lcm(DP=1, 128)
        if i < len(layout) - 1:  # a bucket closes at the first parameter that brings it to >= BUCKET elements
            assert row["numel"] >= BUCKET
            assert row["numel"] - sizes[row["params"][-1]] < BUCKET
        offset += row["padded"]
    assert offset == buffer.numel == buffer.grad_data.numel()
    for param, (start, end, _) in buffer.param_index_map.items():
        assert start % 64 == 0 and end - start == param.numel()  # 64-element aligned starts
        # parameter data and main_grad are views of the bf16 / fp32 buffers at that place
        assert param.dtype == torch.bfloat16 and param.main_grad.dtype == torch.float32
        assert param.data.data_ptr() == buffer.param_data[start:].data_ptr()
        assert param.main_grad.data_ptr() == buffer.grad_data[start:].data_ptr()


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_dp_shards_cover_every_element_once_and_their_norms_sum_to_the_full_norm(megatron_world, dp):
    module, _ = _lm()
    buffer, names = _buffer(module, dp)
    assert buffer.numel % math.lcm(dp, 128) == 0
    for start, end in buffer.bucket_indices:
        assert (end - start) % dp == 0
    owners = {p: torch.zeros(p.numel(), dtype=torch.int32) for p in buffer.params}
    per_rank = []
    for rank in range(dp):
        shards = _rank_ranges(buffer, rank, dp)
        for param, start, end in shards:
            owners[param][start:end] += 1
        per_rank.append(shards)
        # each rank owns 1/dp of every bucket (padding included): at most that many real elements
        owned = sum(end - start for _, start, end in shards)
        assert owned <= buffer.numel // dp
    for param, count in owners.items():
        assert torch.equal(count, torch.ones_like(count)), names[param]
    # Gradients everywhere, padding included (a share that read the padding would be off).
    torch.manual_seed(dp)
    buffer.grad_data.normal_()
    named = [(names[p], p) for p in buffer.params]
    for count_replicated in (True, False):
        full = grad_sq_norm(named, count_replicated=count_replicated)
        shares = [shard_sq_norm(shards, count_replicated=count_replicated) for shards in per_rank]
        assert math.fsum(shares) == pytest.approx(full, rel=1e-12)
        assert full > 0
    assert shard_sq_norm(per_rank[0], count_replicated=True) < grad_sq_norm(named, count_replicated=True) or dp == 1


def test_transformer_config_sums_over_dp(megatron_world):
    module, _ = _lm()
    config = transformer_config_of(module)
    assert config.calculate_per_token_loss and config.hidden_size == 64
    assert not module.language_model.config.calculate_per_token_loss  # a copy: the model's own is untouched
    assert transformer_config_of(torch.nn.Linear(4, 4)).calculate_per_token_loss  # plain torch: a stand-in


def test_resolve_impl():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("auto", cuda) == "megatron"
    assert resolve_impl("torch", cuda) == "torch"
    assert resolve_impl("megatron", cuda) == "megatron"
    with pytest.raises(ValueError, match=r"train.optimizer_impl=megatron needs CUDA.*Torch not compiled with CUDA"):
        resolve_impl("megatron", cpu)


def test_config_and_resume_rules():
    assert load_config("tiny", []).train.optimizer_impl == "auto"
    with pytest.raises(ValueError, match="train.optimizer_impl='zero3' is not allowed"):
        load_config("tiny", ["train.optimizer_impl=zero3"])
    with pytest.raises(ValueError, match="train.grad_bucket_size=-1"):
        load_config("tiny", ["train.grad_bucket_size=-1"])
    with pytest.raises(ValueError, match=r"train.optimizer_impl=megatron needs CUDA stages \(parallel.use_gpu=true\)"):
        load_config("tiny", ["train.optimizer_impl=megatron"])
    assert load_config("tiny", ["train.optimizer_impl=megatron", "parallel.use_gpu=true"]).parallel.use_gpu
    stored = config_to_dict(load_config("tiny", []))
    for change in ("train.optimizer_impl=torch", "train.grad_bucket_size=1000000"):
        field = change.split("=")[0]
        with pytest.raises(ValueError, match=f"cannot resume .*{field}"):
            check_resume_config(stored, config_to_dict(load_config("tiny", [change])), "ckpt")


def test_cpu_stage_keeps_the_torch_optimizer_and_refuses_megatron(megatron_world):
    cfg = load_config("tiny", ["model.modalities=[]", "model.lm.seq_length=32", "train.runtime=fused"])
    stage = FusedStage(cfg)
    stage.setup()
    assert stage.optimizer_impl == "torch" and isinstance(stage.optimizer, MixedPrecisionOptimizer)
    assert "fused" not in stage.optimizer.optimizer.defaults or not stage.optimizer.optimizer.defaults["fused"]
    forced = FusedStage(load_config("tiny", ["model.modalities=[]", "model.lm.seq_length=32", "train.runtime=fused",
                                             "train.optimizer_impl=megatron"]))
    with pytest.raises(ValueError, match=r"\[fused/0\] .*train.optimizer_impl=megatron needs CUDA"):
        forced.setup()


# ----- DistributedAdam end to end on CPU, behind a test-only device patch ------------------------------------------
@pytest.fixture
def cuda_names(monkeypatch):
    """What megatron-core 0.16.1's DistributedOptimizer needs to build on CPU, for this test only: its
    ``torch.tensor(..., device='cuda')`` scalars on the CPU, and ``Tensor.type()`` reporting ``torch.cuda.*`` names
    (its only use of the device: a dtype switch). The stage under test is told to resolve to ``megatron``."""
    real_tensor, real_type = torch.tensor, torch.Tensor.type

    def tensor(*args, **kwargs):
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real_tensor(*args, **kwargs)

    def type_name(self, *args, **kwargs):
        out = real_type(self, *args, **kwargs)
        return out.replace("torch.", "torch.cuda.", 1) if not args and not kwargs else out

    monkeypatch.setattr(torch, "tensor", tensor)
    monkeypatch.setattr(torch.Tensor, "type", type_name)
    monkeypatch.setattr("mimo_ray.stages.base.resolve_impl", lambda impl, device: impl)


def _fused(impl: str, dtype: str = "fp32") -> FusedStage:
    cfg = load_config("tiny", ["model.modalities=[]", "model.lm.seq_length=32", "train.runtime=fused",
                               f"train.optimizer_impl={impl}", f"model.params_dtype={dtype}"])
    stage = FusedStage(cfg)
    stage.setup()
    return stage


def _steps(stage: FusedStage, steps: int, first_seed: int = 0) -> list[tuple[float, float, float]]:
    out = []
    for step in range(steps):
        batches = [random_batch(stage.cfg, 2, seed=first_seed + 10 * step + k) for k in range(2)]
        stats = [stage.forward_backward(b) for b in batches]
        res = stage.optimizer_step(1e-3, 0.5, stage.reduce_grads(*stats))
        loss = sum(s["loss_sum"] for s in stats) / sum(s["num_tokens"] for s in stats)
        out.append((loss, res["grad_norm"], res["clip_coef"]))
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_distributed_adam_steps_like_the_torch_optimizer(megatron_world, cuda_names, dtype):
    from mimo_ray.perf.optimizer_check import expected_bytes
    from mimo_ray.stages.distributed_adam import DistributedAdam

    ref, meg = _fused("torch", dtype), _fused("megatron", dtype)
    assert isinstance(meg.optimizer, DistributedAdam) and isinstance(ref.optimizer, MixedPrecisionOptimizer)
    want, got = _steps(ref, 3), _steps(meg, 3)
    for (l_ref, n_ref, c_ref), (l_got, n_got, c_got) in zip(want, got, strict=True):
        assert c_ref < 1 and c_got < 1  # the driver-side global clip is active
        tol = 1e-6 if dtype == "fp32" else 2e-2  # bf16: rounding of two update orders compounds
        assert l_got == pytest.approx(l_ref, rel=tol)
        assert n_got == pytest.approx(n_ref, rel=10 * tol)
    assert got[0][0] == pytest.approx(want[0][0], rel=1e-6)  # same weights at step 1: same loss in any dtype
    p_ref, p_got = ref.full_parameters(), meg.full_parameters()
    worst = max(float((p_got[k].float() - p_ref[k].float()).abs().max()) for k in p_ref)
    assert worst <= (1e-5 if dtype == "fp32" else 3e-2)  # lr 1e-3, 3 steps
    # Bytes per parameter: fp32 4 + 4 + 8 (masters are the weights), bf16 2 + 4 + 4 + 8; weights and grads padded.
    assert meg.optimizer.bytes_per_param() == pytest.approx(expected_bytes(meg), rel=1e-12)
    assert ref.optimizer.bytes_per_param() == (16.0 if dtype == "fp32" else 18.0)
    base_bytes = 16.0 if dtype == "fp32" else 18.0
    assert base_bytes <= meg.optimizer.bytes_per_param() < base_bytes * 1.01
    with pytest.raises(ValueError, match="full_grads.*megatron"):
        meg.full_grads()


def test_distributed_adam_checkpoint_round_trip(megatron_world, cuda_names, tmp_path):
    stage = _fused("megatron", "bf16")
    _steps(stage, 2)
    stage.save(str(tmp_path))
    assert sorted(p.name for p in (tmp_path / "fused").iterdir()) == ["optim_tp0_dp0.pt", "tp0.pt"]
    saved = torch.load(tmp_path / "fused" / "optim_tp0_dp0.pt", weights_only=True)
    assert saved["impl"] == "megatron" and saved["dp"] == 1
    numel = {n: p.numel() for n, p in stage.module.named_parameters() if p.requires_grad}
    assert {n: s["range"][1] - s["range"][0] for n, s in saved["shards"].items()} == numel  # DP=1: whole params
    for shard in saved["shards"].values():
        assert shard["param"].dtype == shard["exp_avg"].dtype == torch.float32
    fresh = _fused("megatron", "bf16")
    fresh.load(str(tmp_path))
    again = fresh.optimizer.shard_state()
    for name, shard in saved["shards"].items():
        for key, value in shard.items():
            got = again["shards"][name][key]
            assert got == value if key == "range" else torch.equal(got, value), (name, key)
    # Both continue bit-identically (same weights, fp32 masters, moments and step counts).
    assert _steps(fresh, 2, first_seed=100) == _steps(stage, 2, first_seed=100)
    a, b = stage.full_parameters(), fresh.full_parameters()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The other implementation refuses this checkpoint, naming the flag.
    other = _fused("torch", "bf16")
    with pytest.raises(ValueError, match="optimizer state of the megatron optimizer.*train.optimizer_impl=torch"):
        other.load(str(tmp_path))
    other.save(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="optimizer state of the torch optimizer"):
        fresh.load(str(tmp_path / "t"))


@pytest.mark.parametrize("impl", ["torch", "megatron"])
def test_weights_only_load_resets_the_fp32_masters(megatron_world, cuda_names, tmp_path, impl):
    # bf16: a checkpoint without optimizer state (weights only, like an HF import) must also replace the fp32 master
    # copies, or the first step writes the old weights back (an lr=0 step changed weights by 0.5 before the fix).
    stage = _fused(impl, "bf16")
    (tmp_path / "fused").mkdir()
    model = {k: v + 0.5 if v.is_floating_point() else v for k, v in stage.module.state_dict().items()
             if isinstance(v, torch.Tensor)}
    torch.save({"model": model, "optimizer": {}}, tmp_path / "fused" / "tp0.pt")
    stage.load(str(tmp_path))
    loaded = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
    stats = [stage.forward_backward(random_batch(stage.cfg, 2, seed=1))]
    stage.optimizer_step(0.0, 1.0, stage.reduce_grads(*stats))  # lr 0 (weight decay x lr = 0 too): no change
    for name, p in stage.module.named_parameters():
        assert torch.equal(p, loaded[name]), name


def test_distributed_adam_over_gloo_matches_the_torch_optimizer(tmp_path):
    # Two real processes (dist_adam_probe.py): LM DP=2 (reduce-scatter, shard norms, all-gather, sharded checkpoint),
    # LM TP=2 (replicated tensors counted once) and an encoder group at DP=2.
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from mimo_ray.parallel.megatron_setup import free_port

    root = Path(__file__).resolve().parents[3]
    ports = [str(free_port()) for _ in range(7)]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    probe = Path(__file__).with_name("dist_adam_probe.py")
    procs = [subprocess.Popen([sys.executable, str(probe), str(r), str(tmp_path), *ports], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=400)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    r0, r1 = results
    for k in range(2):
        ref, meg = r0["torch"][k], r0["megatron"][k]
        assert meg["coef"] < 1 and meg["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        assert meg["norm"] == pytest.approx(ref["norm"], rel=1e-6)
        # torch: DP rank 0 reports the whole (all-reduced) norm; megatron: each rank its reduce-scattered half
        assert r1["torch"][k]["share"] == 0.0 and r1["megatron"][k]["share"] > 0 and meg["share"] > 0
        assert meg["share"] + r1["megatron"][k]["share"] == pytest.approx(ref["share"], rel=1e-6)
    assert r0["param_diff"] <= 1e-5  # all-gathered parameters after 2 steps, lr 1e-3
    assert r0["shard_numel"] + r1["shard_numel"] == r0["numel"] == r1["numel"]
    assert abs(r0["shard_numel"] - r1["shard_numel"]) <= 128
    assert r0["files"] == ["optim_tp0_dp0.pt", "optim_tp0_dp1.pt", "tp0.pt"]
    for res in results:  # resumed from the DP-sharded checkpoint in a fresh stage: the same third step, bit for bit
        assert res["resumed"] == res["cont"]
    for part in ("tp2", "encoder_dp2"):
        ref, meg = r0[part]["torch"], r0[part]["megatron"]
        assert meg["norm"] == pytest.approx(ref["norm"], rel=1e-6), part
        shares = [r[part]["megatron"]["share"] for r in results]
        assert sum(shares) == pytest.approx(sum(r[part]["torch"]["share"] for r in results), rel=1e-6), part
        assert r0[part]["param_diff"] <= 1e-6, part
    kinds = [r0["encoder_dp2"][impl]["kind"] for impl in ("torch", "megatron")]
    assert kinds == ["MixedPrecisionOptimizer", "DistributedAdam"]
    assert r1["encoder_dp2"]["torch"]["share"] == 0.0 < r1["encoder_dp2"]["megatron"]["share"]
    # TP=2: each TP rank counts its shards, only rank 0 the replicated tensors (both optimizers alike)
    assert r1["tp2"]["megatron"]["share"] == pytest.approx(r1["tp2"]["torch"]["share"], rel=1e-6)
