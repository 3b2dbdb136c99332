"""``DistributedAdam``: a stage's Megatron DDP + DistributedOptimizer behind the verbs of
:class:`mimo_ray.stages.precision.MixedPrecisionOptimizer` (see :mod:`mimo_ray.stages.megatron_optim` for the
arithmetic, the memory per parameter and why it is CUDA-only).

Checkpoint layout (:meth:`DistributedAdam.shard_state` / :meth:`load_shard_state`): one file per (TP rank, DP rank),
``<role>/optim_tp<t>_dp<d>.pt``, holding ``{"impl": "megatron", "dp": DP size, "dp_rank", "groups": [{"lr"[, "step"]}],
"shards": {parameter name: {"range": [start, end], "param": fp32 master shard [end-start], "exp_avg", "exp_avg_sq",
"step"}}}`` for the parameters whose bucket shard this rank owns. A shard only loads into the same DP size and
bucket layout (same ``train.grad_bucket_size``, same trainable parameters); a mismatch raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mimo_ray.config import TrainConfig
from mimo_ray.stages.megatron_optim import (
    ddp_config,
    optimizer_config,
    shard_ranges,
    shard_sq_norm,
    transformer_config_of,
)


class DistributedAdam:
    """AdamW on fp32 master shards (ZeRO-1 over the group's DP ranks), Megatron's implementation.

    Args:
        module: the stage's model part on its CUDA device (its trainable parameters are re-mapped into Megatron's
            contiguous buffers: build this before any other reference to ``param.data`` is kept).
        train: the ``train`` section.
        dtype: the compute dtype of the parameters.
    """

    def __init__(self, module: torch.nn.Module, train: TrainConfig, dtype: torch.dtype):
        from megatron.core.distributed import DistributedDataParallel
        from megatron.core.optimizer import get_megatron_optimizer

        self.module = module
        self.ddp = DistributedDataParallel(transformer_config_of(module), ddp_config(train), module)
        # {}: weight decay on every parameter, as torch.optim.AdamW on the torch path (None would exempt biases/norms).
        self.chained = get_megatron_optimizer(optimizer_config(train, dtype), [self.ddp], config_overrides={},
                                              use_gloo_process_groups=False)  # only its checkpoint helpers use gloo
        (self.inner,) = self.chained.chained_optimizers
        self.names = {p: n for n, p in module.named_parameters() if p.requires_grad}
        self.shards = shard_ranges(self.inner.gbuf_ranges)
        self._use_fused_adam()
        self._accumulate_locally()

    def _use_fused_adam(self) -> None:
        """Use torch's fused AdamW kernel where Megatron fell back to ``torch.optim.AdamW`` (no TE / Apex FusedAdam)."""
        opt = self.inner.optimizer
        on_cuda = all(p.is_cuda for g in opt.param_groups for p in g["params"])
        if isinstance(opt, torch.optim.AdamW) and not opt.state and on_cuda:
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False

    def _accumulate_locally(self) -> None:
        # The stage is not told which micro-batch is the last: no bucket dispatches from the backward hooks.
        for group in self.ddp.bucket_groups + self.ddp.expert_parallel_bucket_groups:
            group.is_last_microbatch = False

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The inner optimizer's groups (``lr`` is set per step)."""
        return self.chained.param_groups

    def zero_grad(self) -> None:
        """Zero the grad buckets and the shard gradients."""
        self.ddp.zero_grad_buffer()
        self.chained.zero_grad()
        self._accumulate_locally()

    def reduce_grads(self, divisor: float) -> bool:
        """Sum every bucket over DP into this rank's shard (reduce-scatter, fp32), divide by ``divisor`` (global loss
        tokens x loss scale) and hand the shard to the fp32 masters.

        Returns:
            Whether Megatron found non-finite gradients (fp16 only; always ``False`` otherwise).
        """
        self.ddp.start_grad_sync()
        self.ddp.finish_grad_sync()
        self.ddp.scale_gradients(1.0 / divisor)
        return bool(self.chained.prepare_grads())

    def grad_sq_norm(self, *, count_replicated: bool) -> float:
        """Share of the squared global grad norm held by this rank (its DP shard; replicated TP tensors where asked)."""
        return shard_sq_norm(self.shards, count_replicated=count_replicated)

    def step(self, coef: float = 1.0) -> None:
        """Scale the shard gradients by the global clip coefficient, step the masters, all-gather the parameters."""
        if coef < 1.0:
            grads = [p.grad for p in self.inner.get_parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, coef)
        self.chained.step_with_ready_grads()

    def sync_masters(self) -> None:
        """Masters := parameters (after loading weights that carry no master copy)."""
        with torch.no_grad():
            self.chained.reload_model_params()

    def shard_state(self) -> dict[str, Any]:
        """The optimizer shard of this rank as CPU tensors (layout in the module docstring)."""
        dp = self.inner.data_parallel_group
        shards = {}
        for param, start, end in self.shards:
            if end <= start:
                continue
            tensors = self.inner._get_main_param_and_optimizer_states(param)
            shards[self.names[param]] = {"range": [start, end],
                                         **{k: torch.as_tensor(v).detach().cpu().clone() for k, v in tensors.items()}}
        # Group-level counters: TE/Apex FusedAdam keep the step per group (torch.optim.AdamW keeps it per parameter).
        groups = [{"lr": g["lr"], **({"step": g["step"]} if "step" in g else {})}
                  for g in self.inner.optimizer.param_groups]
        return {"impl": "megatron", "dp": dp.size(), "dp_rank": dp.rank(), "groups": groups, "shards": shards}

    def load_shard_state(self, state: dict[str, Any], where: str) -> None:
        """Inverse of :meth:`shard_state` (then masters -> parameters stay as the loaded weights).

        Raises:
            ValueError: another implementation, DP size or bucket layout wrote ``state``.
        """
        dp = self.inner.data_parallel_group.size()
        if state.get("impl") != "megatron" or state.get("dp") != dp:
            raise ValueError(f"{where}: optimizer shard of impl {state.get('impl')!r} at DP {state.get('dp')}, this "
                             f"run is megatron at DP {dp}: resume with the checkpoint's parallel.*_dp")
        own = {self.names[p]: (p, s, e) for p, s, e in self.shards if e > s}
        saved = state["shards"]
        bad = sorted(set(own) ^ set(saved)) + sorted(n for n in own if n in saved and
                                                     list(saved[n]["range"]) != [own[n][1], own[n][2]])
        if bad:
            raise ValueError(f"{where}: optimizer shard layout differs (other train.grad_bucket_size or trainable "
                             f"parameters) at {bad[:5]}")
        if not self.inner.optimizer.state:
            self.inner._init_optimizer_states_with_dummy_values()
        with torch.no_grad():  # fp32 masters are views of the (leaf) parameters
            for name, (param, _, _) in own.items():
                tensors = {k: v for k, v in saved[name].items() if k != "range"}
                self.inner._set_main_param_and_optimizer_states(param, tensors)
        for group, counters in zip(self.inner.optimizer.param_groups, state.get("groups", []), strict=False):
            if "step" in counters:
                group["step"] = counters["step"]

    def bytes_per_param(self) -> float:
        """Bytes per trainable parameter this rank holds: 16-bit weights + fp32 grad buckets (padding included) +
        its master and moment shards.
        """
        total = 0
        for buffer in self.ddp.buffers:
            total += buffer.grad_data.numel() * buffer.grad_data.element_size()
            data = buffer.param_data
            if data is not None:
                total += data.numel() * data.element_size()
        for group in self.inner.shard_fp32_from_float16_groups:
            total += sum(m.numel() * 4 for m in group)
        for values in self.inner.optimizer.state.values():
            total += sum(v.numel() * v.element_size() for v in values.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0)
        count = sum(p.numel() for p in self.names)
        return total / count if count else math.nan
