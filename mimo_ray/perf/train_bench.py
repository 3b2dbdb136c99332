"""Train-step benchmarks behind ``jobs/bench.py step`` and ``jobs/bench.py stall``.

- ``step``: the same in-memory micro-batches, pulled by each runtime from an endless in-memory stream (no data
  cost, no driver hop), timed per optimizer step; tokens/s and MFU from :mod:`mimo_ray.perf.flops`.
- ``stall``: the same runtime fed by the Ray Data pipeline (``ManifestDataSource`` over a synthetic data set) vs
  the in-memory stream; the data-stall fraction is ``(t_real - t_memory) / t_real``.

    table = step_table(cfg, ["fused", "disaggregated"], repeats=10, warmup=2, peak=(1.2, "probe"))
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import config_from_dict, config_to_dict, parse_overrides
from mimo_ray.model.inputs import random_batch
from mimo_ray.perf.flops import lm_tokens_per_step, mfu, train_flops_breakdown, train_flops_per_step
from mimo_ray.perf.report import Table, ratio
from mimo_ray.perf.timing import Timing, time_calls
from mimo_ray.runtime import build_runtime

RUNTIMES = ("fused", "disaggregated")


def with_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A copy of ``cfg`` with dotted overrides (``train.runtime=fused``) applied and validated."""
    tree = config_to_dict(cfg)
    for dotted, value in parse_overrides(list(overrides)):
        node = tree
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config_from_dict(tree)


class RepeatStream:
    """Endless, picklable stream cycling over fixed in-memory micro-batches (handed to encoder actors).

    Args:
        batches: C1 micro-batches.
    """

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches = list(batches)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return itertools.cycle(self.batches)


def memory_streams(cfg: Config, seed: int = 0) -> list[RepeatStream]:
    """One :class:`RepeatStream` per encoder rank; together they hold one global batch of random micro-batches."""
    ranks = cfg.parallel.encoder_dp if cfg.train.runtime == "disaggregated" else 1
    count = cfg.data.global_batch_size // cfg.data.micro_batch_size
    batches = [random_batch(cfg, cfg.data.micro_batch_size, seed=seed + k) for k in range(count)]
    return [RepeatStream(batches[r::ranks]) for r in range(ranks)]


class RuntimeCache:
    """Training runtimes built once per benchmark run and shared by ``step`` and ``stall`` (building one costs
    seconds: actors, Megatron import and initialisation).

    Args:
        cfg: the config every runtime is built from (``train.runtime`` is set per runtime).
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self._runtimes: dict[str, tuple[Any, Config]] = {}

    def get(self, runtime: str) -> tuple[Any, Config]:
        """``(runtime object, its config)``, built on first use."""
        if runtime not in self._runtimes:
            run_cfg = with_overrides(self.cfg, [f"train.runtime={runtime}"])
            self._runtimes[runtime] = (build_runtime(run_cfg), run_cfg)
        return self._runtimes[runtime]

    def put(self, runtime: str, rt: Any, cfg: Config) -> None:
        """Use an already built runtime (and its config) for ``runtime``; :meth:`close` closes it too."""
        self._runtimes[runtime] = (rt, cfg)

    def close(self) -> None:
        """Close every runtime built so far."""
        for rt, _ in self._runtimes.values():
            rt.close()
        self._runtimes = {}

    def __enter__(self) -> RuntimeCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _time_feeds(cache: RuntimeCache, runtime: str, repeats: int, warmup: int,
                feeds: Sequence[Callable[[Any, Config], Callable[[], Any]]]) -> list[Timing]:  # fmt: skip
    """For each feed (sets the runtime's data up, returns the step call) time the steps on the cached runtime."""
    rt, run_cfg = cache.get(runtime)
    return [time_calls(feed(rt, run_cfg), repeats, warmup) for feed in feeds]


def _memory_feed(rt: Any, cfg: Config) -> Callable[[], Any]:
    rt.set_data_iterators(memory_streams(cfg))
    return lambda: rt.train_step(None, cfg.train.lr)


def step_table(cfg: Config, runtimes: Sequence[str], repeats: int, warmup: int, peak: tuple[float, str],
               cache: RuntimeCache | None = None) -> Table:  # fmt: skip
    """Train-step time, tokens/s and MFU of each runtime on the same preset, batch and precision.

    Args:
        cfg: the config (preset plus overrides).
        runtimes: subset of ``fused``, ``disaggregated``.
        repeats: timed steps.
        warmup: untimed steps first.
        peak: ``(peak TFLOP/s, where it comes from)`` for MFU.
        cache: runtimes to reuse (``None``: build them here and close them at the end).

    Returns:
        Columns ``runtime, step ms, p10 ms, p90 ms, tokens/s, TFLOP/s, MFU %, vs fused``.
    """
    flops = train_flops_per_step(cfg)
    tokens = lm_tokens_per_step(cfg)
    table = Table(
        "step",
        f"Train step, preset {cfg.preset}: disaggregated vs fused",
        ["runtime", "step ms", "p10 ms", "p90 ms", "tokens/s", "TFLOP/s", "MFU %", "vs fused"],
    )
    with RuntimeCache(cfg) as own:
        timings = {rt: _time_feeds(cache or own, rt, repeats, warmup, [_memory_feed])[0] for rt in runtimes}
    base = timings["fused"].median if "fused" in timings else None
    for name, t in timings.items():
        achieved = flops / t.median / 1e12
        table.add([name, t.median * 1e3, t.p10 * 1e3, t.p90 * 1e3, tokens / t.median, achieved,
                   100 * mfu(flops, t.median, peak[0]), ratio(t.median, base)])  # fmt: skip
        table.extra[name] = t.to_dict()
    breakdown = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in train_flops_breakdown(cfg).items())
    table.notes += [
        f"batch {cfg.data.global_batch_size} x seq {cfg.model.lm.seq_length} ({tokens} LM tokens/step, micro-batch "
        f"{cfg.data.micro_batch_size}), {cfg.model.params_dtype}, attention {cfg.model.attention_backend}, "
        f"torch threads per stage process {cfg.parallel.torch_num_threads or 'default'}",
        f"model FLOPs/step {flops / 1e9:.4g} GFLOP (train = 3 x forward; GFLOP: {breakdown})",
        f"peak {peak[0]:.3g} TFLOP/s: {peak[1]}",
        f"median of {repeats} steps after {warmup} warm-up steps; 'vs fused' = step time / fused step time",
    ]
    table.extra.update({"flops_per_step": flops, "tokens_per_step": tokens, "peak_tflops": peak[0],
                        "peak_source": peak[1], "flops_breakdown": train_flops_breakdown(cfg)})  # fmt: skip
    return table


def _real_feed(data_cfg: Config, holder: dict[str, Any]) -> Callable[[Any, Config], Callable[[], Any]]:
    """Feed from ``ManifestDataSource(data_cfg)``: the driver's ``next_step()`` (fused) or per-rank streams."""

    def feed(rt: Any, cfg: Config) -> Callable[[], Any]:
        from mimo_ray.data.pipeline import ManifestDataSource
        from mimo_ray.runtime.placement import stage_cpu_reservation

        run_cfg = with_overrides(data_cfg, [f"train.runtime={cfg.train.runtime}"])
        src = ManifestDataSource(run_cfg, "train", reserved_cpus=stage_cpu_reservation(run_cfg))
        holder["source"] = src
        if cfg.train.runtime == "disaggregated":
            rt.set_data_iterators(src.rank_streams(cfg.parallel.encoder_dp))
            return lambda: rt.train_step(None, cfg.train.lr)
        return lambda: rt.train_step(src.next_step(), cfg.train.lr)

    return feed


def _stall_rows(table: Table, runtime: str, memory: Timing, real: Timing, tokens: int) -> None:
    stall = max(0.0, 1.0 - memory.median / real.median)
    table.add([runtime, "in-memory", memory.median * 1e3, memory.p90 * 1e3, tokens / memory.median, None])
    table.add([runtime, "pipeline", real.median * 1e3, real.p90 * 1e3, tokens / real.median, 100 * stall])
    table.extra[runtime] = {"memory": memory.to_dict(), "pipeline": real.to_dict()}


def stall_table(cfg: Config, runtimes: Sequence[str], repeats: int, warmup: int, manifest: str, output_dir: str,
                cache: RuntimeCache | None = None) -> Table:  # fmt: skip
    """Step time with decoded data from the pipeline vs in-memory batches, per runtime.

    Args:
        cfg: the config (model shapes must match what the pipeline produces).
        runtimes: subset of ``fused``, ``disaggregated``.
        repeats: timed steps.
        warmup: untimed steps first (the pipeline's start-up falls here).
        manifest: train manifest (JSONL) of the data set.
        output_dir: ``train.output_dir`` for the run (the quarantine file lands there).
        cache: runtimes to reuse (``None``: build them here and close them at the end).

    Returns:
        Columns ``runtime, data, step ms, p90 ms, tokens/s, stall %``.
    """
    steps = warmup + repeats + 2
    real_cfg = with_overrides(cfg, [f"data.data_path={manifest}", f"train.output_dir={output_dir}",
                                    f"train.max_steps={steps}"])  # fmt: skip
    tokens = lm_tokens_per_step(cfg)
    table = Table(
        "stall",
        f"Data stall, preset {cfg.preset}: Ray Data pipeline vs in-memory batches",
        ["runtime", "data", "step ms", "p90 ms", "tokens/s", "stall %"],
    )
    with RuntimeCache(cfg) as own:
        for runtime in runtimes:
            holder: dict[str, Any] = {}
            feeds = [_memory_feed, _real_feed(real_cfg, holder)]
            try:
                memory, real = _time_feeds(cache or own, runtime, repeats, warmup, feeds)
            finally:
                if "source" in holder:
                    holder["source"].close()
            _stall_rows(table, runtime, memory, real, tokens)
    table.notes += [
        f"data set: {manifest}; decode workers {cfg.data.num_decode_workers}; micro-batch "
        f"{cfg.data.micro_batch_size}, batch {cfg.data.global_batch_size}",
        "stall % = max(0, 1 - t_in-memory / t_pipeline) of the median step times; fused: the driver pulls "
        "next_step(), disaggregated: the encoder actors pull their rank_streams()",
        f"median of {repeats} steps after {warmup} warm-up steps (pipeline start-up is in the warm-up)",
    ]
    return table
