"""Optimizer and gradient arithmetic shared by every stage and by the fused runtime, so both runtimes run one math.

A step is: accumulate ``sum(loss * loss_mask)`` gradients over micro-batches → data-parallel sum → divide by the
global token count → global grad norm from every group's contribution → clip → AdamW.

    opt = build_optimizer(model.parameters(), cfg.train)
    part = grad_sq_norm(model.named_parameters(), count_replicated=True)
    norm = total_norm([part, *other_groups_parts]); coef = clip_coefficient(norm, cfg.train.grad_clip)
    # the stage's MixedPrecisionOptimizer.step(coef) applies the clip factor
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mimo_ray.config import TrainConfig

# torch.nn.utils.clip_grad_norm_ adds this to the norm before dividing.
CLIP_EPS = 1e-6


def build_optimizer(params: Iterable[torch.nn.Parameter], train: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``params`` with betas / eps / weight decay from ``train`` (the lr is set per step).

    Args:
        params: the parameters this process owns (a TP shard is optimised where it lives).
        train: the ``train`` section of the config.

    Returns:
        The optimizer.
    """
    params = [p for p in params if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=train.lr,
        betas=(train.adam_beta1, train.adam_beta2),
        eps=getattr(train, "adam_eps", 1e-8),
        weight_decay=train.weight_decay,
        **fused_kwargs(params),
    )


def fused_kwargs(params: Iterable[torch.Tensor]) -> dict[str, bool]:
    """``{"fused": True}`` (torch's fused AdamW kernel) when every parameter is a CUDA tensor, else ``{}`` (torch's
    default, foreach, on CPU: the CPU path keeps its exact arithmetic).
    """
    params = list(params)
    return {"fused": True} if params and all(p.is_cuda for p in params) else {}


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def is_tp_sharded(param: torch.Tensor) -> bool:
    """Whether Megatron split this parameter across tensor-parallel ranks (each rank holds a distinct shard)."""
    return bool(getattr(param, "tensor_model_parallel", False))


def param_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient the optimizer will use: the fp32 ``main_grad`` of a mixed-precision parameter, else ``.grad``."""
    if hasattr(param, "main_grad"):
        return param.main_grad
    return param.grad


def grad_sq_norm(named_params: Iterable[tuple[str, torch.Tensor]], *, count_replicated: bool) -> float:
    """Share of the squared global gradient norm held by this process, in float64.

    TP-sharded parameters are counted on every TP rank (each holds a different shard); replicated ones only where
    ``count_replicated`` (TP rank 0), so each element of the full model is counted exactly once.

    Args:
        named_params: ``(name, parameter)`` pairs; parameters without a gradient are skipped.
        count_replicated: count parameters that every TP rank holds in full.

    Returns:
        Sum of squared gradient elements.
    """
    grads = [param_grad(p) for _, p in named_params if count_replicated or is_tp_sharded(p)]
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        if g is not None:
            by_device.setdefault(g.device, []).append(g)
    parts: list[float] = []
    for group in by_device.values():
        # One fused kernel launch series and one device sync per device (not one per parameter); float64
        # accumulation per tensor, then an order-independent host sum.
        norms = torch._foreach_norm(group, 2, dtype=torch.float64)
        parts.extend(torch.stack(norms).pow(2).cpu().tolist())
    return math.fsum(parts)


def total_norm(sq_parts: Iterable[float]) -> float:
    """Global L2 norm from the squared contributions of all groups and ranks (order-independent sum)."""
    return math.sqrt(math.fsum(sq_parts))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """Scale that brings the global grad norm to ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s rule).

    Args:
        norm: the pre-clip global norm.
        max_norm: ``train.grad_clip``; ``0`` disables clipping.

    Returns:
        A factor ``<= 1`` (``1.0`` when no clipping applies).
    """
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + CLIP_EPS))


def divide_grads(params: Iterable[torch.Tensor], divisor: float) -> None:
    """Divide every existing gradient (``main_grad`` where present) in place: summed per-token losses → mean."""
    for p in params:
        grad = param_grad(p)
        if grad is not None:
            grad.div_(divisor)
