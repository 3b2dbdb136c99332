"""Mixed precision the way Megatron does it, small enough to run on the CPU/gloo path as well as on GPU.

Parameters and activations live in the compute dtype (``model.params_dtype``). Every parameter gets an fp32
``main_grad`` that a post-accumulate hook fills after each backward (micro-batch gradients are summed in fp32, the
low-precision ``.grad`` is dropped at once); the optimizer steps fp32 *master* copies of the low-precision parameters
and copies the result back (round to nearest). fp16 additionally scales the loss by a dynamic loss scale and skips
steps whose gradients overflowed.

Megatron's own pieces (``DistributedDataParallel`` with its grad buffers, ``Float16OptimizerWithFloat16Params``,
``DistributedOptimizer``, ``DynamicGradScaler``, ``clip_grad_norm_fp32``) allocate on ``"cuda"`` in 0.16.1, and the
optimizers reject non-CUDA tensors by type name, so they cannot run on our CPU machines; this module is the smallest
equivalent, with the same arithmetic (fp32 main grads, fp32 masters, global-norm clip on fp32 grads, Megatron's
scaler rules). Memory per parameter: bf16 weight 2 + fp32 main grad 4 + fp32 master 4 + Adam moments 8 = 18 bytes
(fp32: weight 4 + grad 4 + moments 8 = 16; master weights are the parameters themselves).

    opt = MixedPrecisionOptimizer(module.named_parameters(), cfg.train, torch.bfloat16)
    loss.backward()                      # hooks: p.main_grad (fp32) += p.grad; p.grad = None
    opt.step(lr, clip_coef)              # AdamW on fp32 masters, copy back to the bf16 parameters
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mimo_ray.config import Config, TrainConfig
from mimo_ray.stages.optim import fused_kwargs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(cfg: Config) -> torch.dtype:
    """The torch dtype of ``model.params_dtype``."""
    return DTYPES[cfg.model.params_dtype]


def cast_module(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast parameters and floating buffers to ``dtype`` (Megatron's ``Float16Module`` cast), in place.

    Submodules with ``keep_fp32 = True`` (e.g. the mel transform that turns target waveforms into log-mel) stay fp32.

    Returns:
        ``module``.
    """
    if dtype == torch.float32:
        return module
    module.to(dtype)
    for sub in module.modules():
        if getattr(sub, "keep_fp32", False):
            sub.float()
    return module


class DynamicLossScaler:
    """Megatron's ``DynamicGradScaler`` rules on plain Python floats (identical on every stage).

    The scale is divided by 2 after ``hysteresis`` consecutive overflowing steps (never below ``min_scale``) and
    doubled after ``window`` clean steps.

    Args:
        initial_scale: first loss scale.
        window: clean steps before growing.
        hysteresis: overflowing steps tolerated before backing off.
        min_scale: lower bound.
    """

    def __init__(self, initial_scale: float, window: int, hysteresis: int = 2, min_scale: float = 1.0):
        self.scale = float(initial_scale)
        self.window = window
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self._growth = 0
        self._hysteresis_left = hysteresis

    def update(self, found_inf: bool) -> None:
        """Account for one optimizer step (``found_inf``: its gradients overflowed and it was skipped)."""
        if found_inf:
            self._growth = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale * 0.5, self.min_scale)
        else:
            self._growth += 1
            if self._growth == self.window:
                self._growth = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "growth": self._growth, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self._growth = int(state["growth"])
        self._hysteresis_left = int(state["hysteresis_left"])


def _accumulate_main_grad(param: torch.Tensor) -> None:
    """Post-accumulate hook: move this backward's gradient into the fp32 ``main_grad`` and drop ``.grad``."""
    grad = param.grad
    param.grad = None
    if grad is None:
        return
    if param.main_grad is None:
        param.main_grad = grad if grad.dtype == torch.float32 else grad.float()
    else:
        param.main_grad.add_(grad)


class MixedPrecisionOptimizer:
    """AdamW on fp32 master weights with fp32 main gradients (Megatron's ``Float16OptimizerWithFloat16Params``).

    fp32 parameters are their own masters (no copy), so an fp32 model runs exactly the arithmetic of a plain AdamW.

    Args:
        params: the parameters this process owns (TP shards where they live); ones without ``requires_grad`` are
            left out.
        train: the ``train`` section (betas, eps, weight decay; the lr is set per step).
    """

    def __init__(self, params: Iterable[nn.Parameter], train: TrainConfig):
        self.params = [p for p in params if p.requires_grad]
        self.masters: list[torch.Tensor] = []
        for p in self.params:
            p.main_grad = None
            p.register_post_accumulate_grad_hook(_accumulate_main_grad)
            self.masters.append(p if p.dtype == torch.float32 else p.detach().float().clone())
        self.optimizer = torch.optim.AdamW(
            self.masters,
            lr=train.lr,
            betas=(train.adam_beta1, train.adam_beta2),
            eps=getattr(train, "adam_eps", 1e-8),
            weight_decay=train.weight_decay,
            **fused_kwargs(self.masters),
        )

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        """Forget the accumulated main gradients (and any stray ``.grad``)."""
        for p in self.params:
            p.main_grad = None
            p.grad = None

    def step(self, coef: float = 1.0) -> None:
        """One AdamW step on the masters from ``main_grad * coef``; low-precision parameters get the rounded result.

        Parameters without a main gradient this step are skipped (as ``torch.optim`` skips ``grad=None``).
        """
        for p, master in zip(self.params, self.masters, strict=True):
            grad = p.main_grad
            master.grad = None if grad is None else (grad * coef if coef < 1.0 else grad)
        self.optimizer.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.masters, strict=True):
                if master is not p and master.grad is not None:
                    p.copy_(master)
                master.grad = None

    def sync_masters(self) -> None:
        """Masters := parameters (after loading weights that carry no master copy)."""
        with torch.no_grad():
            for p, master in zip(self.params, self.masters, strict=True):
                if master is not p:
                    master.copy_(p)

    @property
    def state(self) -> dict:
        """The inner AdamW's per-parameter state (moments of the fp32 masters), as ``torch.optim`` exposes it."""
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        """AdamW's state dict, plus ``master_weights`` (fp32, by parameter index) when a parameter is low precision."""
        state = self.optimizer.state_dict()
        pairs = enumerate(zip(self.params, self.masters, strict=True))
        masters = {i: m.detach().clone() for i, (p, m) in pairs if m is not p}
        if masters:
            state["master_weights"] = masters
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; without ``master_weights`` the masters are taken from the parameters."""
        state = dict(state)
        masters = state.pop("master_weights", None)
        self.optimizer.load_state_dict(state)
        self.sync_masters()
        if masters:
            with torch.no_grad():
                for i, value in masters.items():
                    self.masters[int(i)].copy_(value)
                    self.params[int(i)].copy_(value)

    def bytes_per_param(self) -> float:
        """Optimizer-side bytes per parameter (weight + fp32 main grad + master + Adam moments), after a step."""
        total = 0
        for p, master in zip(self.params, self.masters, strict=True):
            total += p.numel() * p.element_size() + p.numel() * 4  # weight + main grad
            if master is not p:
                total += master.numel() * 4
            for value in self.optimizer.state.get(master, {}).values():
                if isinstance(value, torch.Tensor) and value.numel() == master.numel():
                    total += value.numel() * value.element_size()
        count = sum(p.numel() for p in self.params)
        return total / count if count else math.nan
