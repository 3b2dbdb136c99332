"""Batched-inference benchmark behind ``jobs/bench.py infer``: the disaggregated inference runtime (encoder actor
→ LM actor generating with a KV cache, prompt batches pipelined) vs the same model in one process, with the cache
and without it (naive: the whole prefix re-run for every new token).

Each runtime gets one stream of ``warmup + repeats`` prompt batches; the time per batch is the gap between
consecutive results (steady-state throughput of a pipelined run), the first ``warmup`` gaps dropped.

    table = infer_table(cfg, repeats=10, warmup=2, batch_size=4, max_new_tokens=16, text_len=10, timeout_s=300)
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.model.inputs import random_batch
from mimo_ray.model.spec import tokens_per_sample
from mimo_ray.perf.report import Table, ratio
from mimo_ray.perf.timing import Timing, intervals
from mimo_ray.stages.streams import ListStream


def prompt_batches(cfg: Config, count: int, batch_size: int, text_len: int, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` right-padded prompt batches: ``[BOS] <media placeholders> text`` of ``text_len`` random tokens,
    with ``prompt_lengths`` and ``ids`` (the format of ``mimo_ray.runtime.inference``).
    """
    prompt = 1 + sum(tokens_per_sample(cfg, m) for m in cfg.model.modalities) + text_len
    out = []
    for i in range(count):
        b = random_batch(cfg, batch_size, seed=seed + i, text_len=text_len)
        batch = {k: b[k] for k in ("input_ids", "position_ids", "modality_inputs")}
        batch["prompt_lengths"] = torch.full((batch_size,), prompt, dtype=torch.long)
        batch["ids"] = [f"bench-{i}-{j}" for j in range(batch_size)]
        out.append(batch)
    return out


def check_fits(cfg: Config, text_len: int, max_new_tokens: int) -> int:
    """Prompt length; raises ``ValueError`` naming the flags when prompt + new tokens exceed ``seq_length``."""
    prompt = 1 + sum(tokens_per_sample(cfg, m) for m in cfg.model.modalities) + text_len
    if prompt + max_new_tokens > cfg.model.lm.seq_length:
        raise ValueError(
            f"prompt of {prompt} tokens + --max-new-tokens {max_new_tokens} exceeds model.lm.seq_length="
            f"{cfg.model.lm.seq_length}; lower --prompt-text-len or --max-new-tokens"
        )
    return prompt


def stream_timing(runtime: Any, batches: list[dict[str, Any]], params: dict[str, Any], warmup: int) -> Timing:
    """Run one stream through ``runtime.run`` and time the gaps between its results (first ``warmup`` dropped).

    Raises:
        RuntimeError: fewer results than batches, or a batch generated the wrong number of tokens.
    """
    start = time.perf_counter()
    stamps = []
    want = len(batches[0]["ids"]) * int(params["max_new_tokens"])
    for result in runtime.run([ListStream(batches)], params):
        stamps.append(time.perf_counter())
        if result["num_generated_tokens"] != want:
            raise RuntimeError(f"a batch generated {result['num_generated_tokens']} tokens, expected {want}")
    if len(stamps) != len(batches):
        raise RuntimeError(f"{len(stamps)} results for {len(batches)} prompt batches")
    return intervals(stamps, start, warmup)


def _timings(kind: str, cfg: Config, batches: list, params: list[dict[str, Any]], warmup: int) -> list[Timing]:
    """One runtime of ``kind`` (``disaggregated`` or ``fused``), one timed stream per entry of ``params``."""
    from mimo_ray.runtime.inference import DisaggregatedInferRuntime, FusedInferRuntime

    runtime = DisaggregatedInferRuntime(cfg, None) if kind == "disaggregated" else FusedInferRuntime(cfg, None)
    try:
        return [stream_timing(runtime, batches, p, warmup) for p in params]
    finally:
        runtime.close()


def infer_table(cfg: Config, repeats: int, warmup: int, batch_size: int, max_new_tokens: int,
                text_len: int) -> Table:  # fmt: skip
    """Samples/s and generated tokens/s: disaggregated (KV cache) vs one process (KV cache) vs one process naive.

    Returns:
        Columns ``runtime, cache, batch ms, p90 ms, samples/s, tokens/s, vs one-process, vs naive``.
    """
    prompt = check_fits(cfg, text_len, max_new_tokens)
    batches = prompt_batches(cfg, warmup + repeats, batch_size, text_len)
    cached = {"max_new_tokens": max_new_tokens, "eos_id": None, "use_cache": True}
    naive = {**cached, "use_cache": False}
    runs = [("disaggregated", "KV cache", cached), ("fused (one process)", "KV cache", cached),
            ("fused (one process)", "none (naive)", naive)]  # fmt: skip
    timings = _timings("disaggregated", cfg, batches, [cached], warmup)
    timings += _timings("fused", cfg, batches, [cached, naive], warmup)
    one_process, no_cache = timings[1].median, timings[2].median
    table = Table(
        "infer",
        f"Batched generation, preset {cfg.preset}: disaggregated vs one process vs naive",
        ["runtime", "cache", "batch ms", "p90 ms", "samples/s", "tokens/s", "vs one-process", "vs naive"],
    )
    new_tokens = batch_size * max_new_tokens
    for (name, cache, _), t in zip(runs, timings, strict=True):
        table.add([name, cache, t.median * 1e3, t.p90 * 1e3, batch_size / t.median, new_tokens / t.median,
                   ratio(one_process, t.median), ratio(no_cache, t.median)])  # fmt: skip
        table.extra[f"{name} / {cache}"] = t.to_dict()
    table.notes += [
        f"{warmup + repeats} prompt batches of {batch_size} ({prompt} prompt tokens, {max_new_tokens} new tokens "
        f"each, fixed length: eos_id=None), greedy; {cfg.model.params_dtype}",
        f"batch ms = median gap between consecutive results after {warmup} warm-up batches (steady-state "
        "throughput; the disaggregated runtime keeps 2 batches in flight)",
        "'vs one-process' / 'vs naive' = throughput over that of the fused runtime with / without the KV cache",
    ]
    return table
