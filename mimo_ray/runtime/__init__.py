"""Training runtimes: ``fused`` (the whole model in the driver process) and ``disaggregated`` (encoder and LM actor
groups on Ray). Both implement :class:`TrainRuntime` with the same optimizer, clipping and loss normalisation:

    rt = build_runtime(cfg)                       # cfg.train.runtime: "fused" | "disaggregated"
    rt.set_data_iterators(shards)                 # optional: one stream of C1 micro-batches per encoder DP rank
    out = rt.train_step(None, lr)                 # {"loss", "num_tokens", "grad_norm", "step_time_s", "sample_ids"}
    rt.save_checkpoint("run/step_10"); rt.close()

``train_step(microbatches, lr)``: one optimizer step over ``data.global_batch_size`` samples given as a list of
micro-batches, or pulled by the encoder ranks from their streams when ``None`` (micro-batch ``k`` of a step comes
from stream ``k % encoder_dp``; random batches until streams are set). ``loss`` is ``sum(loss*mask)/sum(mask)`` over
the whole global batch; ``grad_norm`` is the pre-clip global norm over every group.
"""

from __future__ import annotations

from typing import Any

from mimo_ray.config import Config
from mimo_ray.runtime.base import Batch, TrainRuntime
from mimo_ray.runtime.placement import InsufficientResourcesError

__all__ = ["Batch", "InsufficientResourcesError", "TrainRuntime", "build_runtime"]


def build_runtime(cfg: Config, spec: Any = None) -> TrainRuntime:
    """Build the runtime ``cfg.train.runtime`` names, over ``spec`` (the run's ``MimoModelConfig``; ``None``: built
    from ``cfg``).

    ``disaggregated`` creates the actor groups on the running Ray instance (``ray.init(**cfg.cluster.init_kwargs())``
    when none is running); ``fused`` initialises Megatron (world of 1) in this process.

    Raises:
        ValueError: unknown runtime or impossible layout (naming the field).
        InsufficientResourcesError: the cluster cannot host the groups.
    """
    if cfg.train.runtime == "fused":
        from mimo_ray.runtime.fused import FusedRuntime

        return FusedRuntime(cfg, spec)
    if cfg.train.runtime == "disaggregated":
        import ray

        from mimo_ray.runtime.disaggregated import DisaggregatedRuntime

        if not ray.is_initialized():
            ray.init(**cfg.cluster.init_kwargs())
        return DisaggregatedRuntime(cfg, spec)
    raise ValueError(f"train.runtime={cfg.train.runtime!r} is not allowed; choose one of fused, disaggregated")
