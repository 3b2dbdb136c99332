"""The contract every runtime meets (what the driver calls) and the step summary both runtimes report."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import torch

from mimo_ray.config import Config

Batch = dict[str, Any]


@runtime_checkable
class TrainRuntime(Protocol):
    """One optimizer step per call over ``data.global_batch_size`` samples; see ``mimo_ray/runtime/__init__.py``."""

    def train_step(self, microbatches: list[Batch] | None, lr: float) -> dict: ...

    def eval_step(self, microbatches: list[Batch] | None) -> dict: ...

    def set_data_iterators(self, iterators: list) -> None: ...

    def save_checkpoint(self, path: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...

    def grads(self) -> dict[str, torch.Tensor]: ...

    def named_parameters_full(self) -> dict[str, torch.Tensor]: ...

    def close(self) -> None: ...


def summarize(stats: list[dict[str, float]]) -> dict[str, Any]:
    """Global per-token mean loss of a step from its micro-batch stats.

    Args:
        stats: ``{"loss_sum", "num_tokens"}`` (+ ``"<output>_loss_sum"``) per micro-batch.

    Returns:
        ``{"loss": sum(loss*mask)/sum(mask), "num_tokens": int}`` (``nan`` loss when there are no tokens); with
        output decoders also ``"<output>_loss"`` and ``"text_loss"``, on the same scale, summing to ``loss``.
    """
    tokens = math.fsum(s["num_tokens"] for s in stats)

    def mean(key: str) -> float:
        return math.fsum(s.get(key, 0.0) for s in stats) / tokens if tokens else float("nan")

    out: dict[str, Any] = {"loss": mean("loss_sum"), "num_tokens": int(round(tokens))}
    parts = sorted({k for s in stats for k in s if k.endswith("_loss_sum") and k != "loss_sum"})
    for key in parts:
        out[key[: -len("_sum")]] = mean(key)
    if parts:
        out["text_loss"] = out["loss"] - math.fsum(out[k[: -len("_sum")]] for k in parts)
    return out


def check_iterators(iterators: Iterable, expected: int | None, *, picklable: bool) -> list:
    """Validate the per-rank data streams given to ``set_data_iterators``.

    Args:
        iterators: one iterable of C1 micro-batches per encoder data-parallel rank.
        expected: required count (``parallel.encoder_dp``), or ``None`` for any.
        picklable: they will be sent to actors (generator objects cannot be).

    Raises:
        ValueError: wrong count (naming ``parallel.encoder_dp``).
        TypeError: a generator object that would have to cross a process boundary.
    """
    iterators = list(iterators)
    if expected is not None and len(iterators) != expected:
        raise ValueError(f"set_data_iterators got {len(iterators)} iterators; parallel.encoder_dp={expected}")
    if picklable:
        for i, it in enumerate(iterators):
            if inspect.isgenerator(it):
                raise TypeError(
                    f"iterator {i} is a generator object, which cannot be sent to an encoder actor; pass an "
                    "iterable object (a class with __iter__, a list, a Ray DataIterator) or a zero-argument "
                    "function that returns the iterator"
                )
    return iterators


def loss_scale_metrics(cfg: Config, step: dict[str, Any]) -> dict[str, float]:
    """fp16 only: ``{"loss_scale", "skipped_step"}`` of an ``optimizer_step`` result (equal on every stage).

    Returns:
        Those two numbers, or ``{}`` in bf16/fp32 (no loss scale).
    """
    if cfg.model.params_dtype != "fp16":
        return {}
    return {"loss_scale": float(step["loss_scale"]), "skipped_step": float(step["skipped"])}
