"""The ``fused`` runtime: the whole MimoModel in the driver process, no Ray actors. Same optimizer, normalisation,
clipping and data order as the disaggregated runtime, so it is also the oracle of its exactness tests (C3).

    rt = FusedRuntime(load_config("tiny", ["train.runtime=fused"]))
    out = rt.train_step(None, lr=1e-3)        # random batches, round-robin over parallel.encoder_dp streams
"""

from __future__ import annotations

import time
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.runtime.base import Batch, check_iterators, loss_scale_metrics, summarize
from mimo_ray.stages.fused import FusedStage
from mimo_ray.stages.streams import random_streams


class FusedRuntime:
    """In-process runtime over ``build_fused_model(cfg, spec)`` (Megatron world of 1 in this process).

    Args:
        cfg: the config.
        spec: the run's ``MimoModelConfig`` (``None``: built from ``cfg``).
    """

    def __init__(self, cfg: Config, spec: Any = None):
        self.cfg = cfg
        self.stage = FusedStage(cfg, spec)
        self.info = self.stage.setup()
        self._iterators: list | None = None

    def set_data_iterators(self, iterators: list) -> None:
        """Streams read round-robin: micro-batch ``k`` of a step comes from ``iterators[k % len(iterators)]``."""
        streams = check_iterators(iterators, None, picklable=False)
        if not streams:
            raise ValueError("set_data_iterators needs at least one iterator")
        self._iterators = [iter(it() if callable(it) and not hasattr(it, "__iter__") else it) for it in streams]

    def _pull(self) -> list[Batch]:
        if self._iterators is None:
            self._iterators = [iter(s) for s in random_streams(self.cfg)]
        count = self.cfg.data.global_batch_size // self.cfg.data.micro_batch_size
        return [next(self._iterators[k % len(self._iterators)]) for k in range(count)]

    def train_step(self, microbatches: list[Batch] | None, lr: float) -> dict[str, Any]:
        """One optimizer step over the micro-batches (or ``global_batch_size`` samples pulled from the streams).

        Returns:
            ``{"loss", "num_tokens", "grad_norm", "step_time_s", "sample_ids"}`` (ids of the samples stepped on).
        """
        start = time.perf_counter()
        batches = self._pull() if microbatches is None else microbatches
        stats = [self.stage.forward_backward(mb) for mb in batches]
        sq_norm = self.stage.reduce_grads(*stats)
        step = self.stage.optimizer_step(lr, self.cfg.train.grad_clip, sq_norm)
        out = {**summarize(stats), "grad_norm": step["grad_norm"], "step_time_s": time.perf_counter() - start}
        out["sample_ids"] = [i for mb in batches for i in (mb.get("ids") or ())]
        return {**out, **loss_scale_metrics(self.cfg, step)}

    def eval_step(self, microbatches: list[Batch] | None) -> dict[str, Any]:
        """Loss over the micro-batches without gradients."""
        batches = self._pull() if microbatches is None else microbatches
        return summarize([self.stage.forward_only(mb) for mb in batches])

    def param_counts(self) -> dict[str, int]:
        """``{"trainable_params", "frozen_params"}`` of the whole model (``model.freeze``)."""
        return {k: self.info[k] for k in ("trainable_params", "frozen_params")}

    def save_checkpoint(self, path: str) -> None:
        """``<path>/fused/tp0.pt``: model and optimizer state."""
        self.stage.save(path)

    def load_checkpoint(self, path: str) -> None:
        """Load what :meth:`save_checkpoint` wrote."""
        self.stage.load(path)

    def grads(self) -> dict[str, torch.Tensor]:
        """Pre-clip gradients of the last step, keyed like the fused model's ``named_parameters()``."""
        return self.stage.full_grads()

    def named_parameters_full(self) -> dict[str, torch.Tensor]:
        """Current parameter values (copies)."""
        return self.stage.full_parameters()

    def close(self) -> None:
        """Drop the model (the process's Megatron world stays for other users)."""
        self.stage = None

    def __enter__(self) -> FusedRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
