"""Megatron's distributed optimizer against mimo_ray's torch optimizer (issue 22 item 5): the same fused stage, the
same weights and batches, a few steps each; losses, global grad norms and the optimizer's resident bytes per
parameter. CUDA only (``train.optimizer_impl=megatron`` needs it). Used by ``jobs/gpu_check.py`` (check
``distributed_optimizer``) and ``tests/unit/stages/test_distributed_optimizer_gpu.py``.

    runs = compare_optimizers(load_config("tiny", ["model.params_dtype=bf16"]), steps=3)   # after init_megatron()
    runs["megatron"].losses, runs["torch"].losses, runs["megatron"].bytes_per_param
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mimo_ray.config import Config

#: Relative loss difference between the two optimizers: the first step sees the same weights (only the gradient
#: reduction order differs), later steps compound bf16 rounding of two AdamW kernels (torch fused vs Megatron's).
LOSS_TOL_FIRST = 1e-3
LOSS_TOL_RUN = 2e-2
#: Relative difference of the first step's pre-clip global grad norm (same weights, same fp32 main gradients).
NORM_TOL_FIRST = 1e-3


@dataclass
class OptimizerRun:
    """One implementation's steps."""

    impl: str
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    bytes_per_param: float = 0.0
    #: What :mod:`mimo_ray.perf.memory` predicts for this stage (Megatron: with the buckets' padding).
    expected_bytes_per_param: float = 0.0


def expected_bytes(stage: Any) -> float:
    """:func:`mimo_ray.perf.memory.optimizer_bytes_per_param` for ``stage`` at its DP size; for Megatron the weight
    and grad buffers are scaled by their padding (padded / unpadded elements).
    """
    from megatron.core import parallel_state

    from mimo_ray.perf.memory import optimizer_bytes_per_param

    mixed = stage.cfg.model.params_dtype != "fp32"
    if stage.optimizer_impl != "megatron":
        return optimizer_bytes_per_param("local", 1, mixed).total
    dp = parallel_state.get_data_parallel_world_size()
    per = optimizer_bytes_per_param("megatron-distributed", dp, mixed)
    buffers = stage.optimizer.ddp.buffers
    pad = sum(b.numel for b in buffers) / sum(p.numel() for b in buffers for p in b.params)  # alignment + bucket ends
    return (per.weights + per.grads) * pad + per.optimizer


def run_impl(cfg: Config, impl: str, batches: list[dict[str, Any]], steps: int, lr: float) -> tuple[OptimizerRun, Any]:
    """``steps`` optimizer steps of a fused stage with ``train.optimizer_impl=impl`` over ``batches`` each step.

    Returns:
        ``(run, stage)`` (the stage for further checks, e.g. a checkpoint round trip).
    """
    from mimo_ray.stages.fused import FusedStage

    stage = FusedStage(_with_impl(cfg, impl))
    stage.setup()
    run = OptimizerRun(impl)
    for _ in range(steps):
        loss, norm = train_step(stage, batches, lr)
        run.losses.append(loss)
        run.grad_norms.append(norm)
    run.bytes_per_param = stage.optimizer.bytes_per_param()
    run.expected_bytes_per_param = expected_bytes(stage)
    return run, stage


def train_step(stage: Any, batches: list[dict[str, Any]], lr: float) -> tuple[float, float]:
    """One step of ``stage`` over ``batches`` (micro-batches); returns ``(mean loss per token, pre-clip norm)``."""
    stats = [stage.forward_backward(b) for b in batches]
    out = stage.optimizer_step(lr, stage.cfg.train.grad_clip, stage.reduce_grads(*stats))
    loss = sum(s["loss_sum"] for s in stats) / sum(s["num_tokens"] for s in stats)
    return float(loss), float(out["grad_norm"])


def _with_impl(cfg: Config, impl: str) -> Config:
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, optimizer_impl=impl, runtime="fused"))


def compare_optimizers(cfg: Config, steps: int = 3, lr: float = 1e-4, num_microbatches: int = 2,
                       ) -> dict[str, OptimizerRun]:
    """Both implementations on the same random micro-batches (``data.micro_batch_size`` samples each).

    Returns:
        ``{"torch": run, "megatron": run}``.
    """
    from mimo_ray.model.inputs import random_batch

    batches = [random_batch(cfg, cfg.data.micro_batch_size, seed=200 + k) for k in range(num_microbatches)]
    runs = {}
    for impl in ("torch", "megatron"):
        runs[impl], stage = run_impl(cfg, impl, batches, steps, lr)
        del stage
    return runs


def agreement(runs: dict[str, OptimizerRun]) -> tuple[bool, str]:
    """Whether the Megatron run agrees with the torch run (loss, first grad norm, predicted bytes per parameter).

    Returns:
        ``(passed, one-line summary with the numbers)``.
    """
    ref, meg = runs["torch"], runs["megatron"]
    first = _rel(meg.losses[0], ref.losses[0])
    worst = max(_rel(a, b) for a, b in zip(meg.losses, ref.losses, strict=True))
    norm = _rel(meg.grad_norms[0], ref.grad_norms[0])
    mem = _rel(meg.bytes_per_param, meg.expected_bytes_per_param)
    ok = first <= LOSS_TOL_FIRST and worst <= LOSS_TOL_RUN and norm <= NORM_TOL_FIRST and mem <= 1e-6
    text = (f"loss step 1 rel {first:.1e} (<= {LOSS_TOL_FIRST:g}), worst of {len(ref.losses)} {worst:.1e} "
            f"(<= {LOSS_TOL_RUN:g}); grad norm step 1 rel {norm:.1e}; bytes/param megatron "
            f"{meg.bytes_per_param:.2f} (predicted {meg.expected_bytes_per_param:.2f}) vs torch "
            f"{ref.bytes_per_param:.2f}")
    return ok, text


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)
