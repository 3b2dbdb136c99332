"""Helpers for the C3 oracle: run the fused and the disaggregated runtime side by side and measure differences."""

from __future__ import annotations

import pytest
from tolerances import params_ratio, rel

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch
from mimo_ray.runtime import build_runtime

# Small enough for 2 cores, big enough for gradient accumulation on every rank (4 micro-batches of 2).
BASE = ["data.micro_batch_size=2", "data.global_batch_size=8", "model.lm.seq_length=96", "train.grad_clip=1.0"]


def compare_runtimes(overrides: list[str], steps: int = 5, inspect=None) -> dict[str, float]:
    """Step both runtimes from the same weights: step 1 on explicit micro-batches, then pulled random streams.

    ``inspect(disaggregated_runtime)`` runs before the runtime is closed.

    Returns:
        Largest relative differences: ``loss1``, ``grad_norm1``, ``grads1`` (worst parameter), ``loss_traj`` (worst
        step), ``eval``, ``params_end`` (:func:`tolerances.params_ratio`: <= 1 is within the AdamW bound); plus
        ``num_grads`` and the disaggregated ``step_time_s`` of the last step.
    """
    cfg = load_config("tiny", [*BASE, *overrides, "train.runtime=disaggregated"])
    fcfg = load_config("tiny", [*BASE, *overrides, "train.runtime=fused"])
    out: dict[str, float] = {}
    fused = build_runtime(fcfg)
    with build_runtime(cfg) as dis:
        n = cfg.data.global_batch_size // cfg.data.micro_batch_size
        mbs = [random_batch(cfg, cfg.data.micro_batch_size, seed=100 + i) for i in range(n)]
        ref, got = fused.train_step(mbs, lr=1e-3), dis.train_step(mbs, lr=1e-3)
        assert got["num_tokens"] == ref["num_tokens"] > 0
        out["loss1"] = rel(got["loss"], ref["loss"])
        out["grad_norm1"] = rel(got["grad_norm"], ref["grad_norm"])
        fg, dg = fused.grads(), dis.grads()
        assert set(dg) == set(fg) == set(fused.named_parameters_full())
        out["grads1"] = max(rel(dg[k], fg[k]) for k in fg)
        out["num_grads"] = len(fg)
        traj = [out["loss1"]]
        for step in range(1, steps):
            lr = 1e-3 * (1 - step / (2 * steps))
            r, g = fused.train_step(None, lr), dis.train_step(None, lr)
            assert g["num_tokens"] == r["num_tokens"]
            traj.append(rel(g["loss"], r["loss"]))
        out["loss_traj"] = max(traj)
        out["eval"] = rel(dis.eval_step(mbs)["loss"], fused.eval_step(mbs)["loss"])
        fp, dp = fused.named_parameters_full(), dis.named_parameters_full()
        out["params_end"] = params_ratio(dp, fp, lr=1e-3, steps=steps)
        if inspect is not None:
            inspect(dis)
        out["step_time_s"] = g["step_time_s"]
        out["fused_step_time_s"] = r["step_time_s"]
    fused.close()
    return out


@pytest.fixture
def compare():
    """:func:`compare_runtimes` (needs ``ray_local`` and ``megatron_world``)."""
    return compare_runtimes


@pytest.fixture
def report(record_property):
    """Record measured differences in the JUnit report and print them (``pytest -s``)."""

    def _report(name: str, values: dict[str, float]) -> None:
        for key, value in values.items():
            record_property(key, value)
        print(f"\n[exactness] {name}: " + ", ".join(f"{k}={v:.3g}" for k, v in values.items()))

    return _report
