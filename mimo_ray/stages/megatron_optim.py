"""Megatron's ZeRO-1 optimizer for one stage group on CUDA: ``DistributedDataParallel`` (fp32 gradient buckets,
reduce-scattered over the group's DP ranks) + ``DistributedOptimizer`` (fp32 master weights and Adam moments of the
rank's 1/DP shard of every bucket), driven by the stage's two-phase step.

Our step spans several torch.distributed worlds (each encoder group, the LM group), so the clip is global and comes
from the driver, not from Megatron's ``clip_grad_norm``:

    opt = DistributedAdam(module, cfg.train, torch.bfloat16)    # wraps the module's trainable parameters
    loss.backward()                        # DDP hooks: p.main_grad (a view of the fp32 bucket) += p.grad
    opt.reduce_grads(num_tokens)           # reduce-scatter (sum over DP), / num_tokens, shard grads -> main params
    share = opt.grad_sq_norm(count_replicated=tp_rank == 0)  # this rank's shard only: the DP sum is the full norm
    opt.step(lr, clip_coef)                # coef * shard grads, Adam on the fp32 shard, all-gather the parameters
    opt.zero_grad()

Memory per parameter on one GPU: 16-bit weight 2 + fp32 grad bucket 4 + (fp32 master 4 + moments 8) / DP
(fp32 weights are their own masters: 4 + 4 + 8 / DP), plus the buckets' padding (each bucket is padded to a
multiple of lcm(DP, 128) elements, each parameter starts at a multiple of 64).

Where megatron-core 0.16.1 runs: ``DistributedDataParallel`` and its ``_ParamAndGradBuffer`` build on CPU/gloo with
``mimo_ray.parallel.megatron_setup``'s CPU layer (``torch.cuda.current_device()`` routed to the CPU), so the bucket
layout and the shard arithmetic are tested on CPU. ``DistributedOptimizer`` cannot be built without CUDA:
``MixedPrecisionOptimizer.__init__`` allocates ``torch.tensor(..., device='cuda')`` (``AssertionError: Torch not
compiled with CUDA enabled``) and its main-param set-up accepts only ``torch.cuda.*Tensor`` types. Hence
``train.optimizer_impl=megatron`` is refused on CPU (:func:`resolve_impl`).

The multi-micro-batch gradient accumulation runs with the buckets' ``is_last_microbatch`` off (the stage is not told
which micro-batch is the last one), so the reduce-scatters are dispatched per bucket, asynchronously and coalesced,
in :meth:`DistributedAdam.reduce_grads` rather than overlapped with the last backward.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import torch

from mimo_ray.config import TrainConfig
from mimo_ray.stages.optim import is_tp_sharded

#: Megatron names this module relies on beyond the public API (pinned megatron-core 0.16.1; a test checks them).
MEGATRON_INTERNALS: tuple[tuple[str, str], ...] = (
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_build_gbuf_range_map"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_get_main_param_and_optimizer_states"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_set_main_param_and_optimizer_states"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_init_optimizer_states_with_dummy_values"),
    ("megatron.core.optimizer.distrib_optimizer.DistributedOptimizer", "_get_model_param_range_map"),
)
#: Instance attributes set by ``_ParamAndGradBucketGroup.__init__`` that we write (checked on a built DDP).
BUCKET_GROUP_ATTRS = ("is_last_microbatch",)

#: Why the Megatron optimizer cannot run on a CUDA-less torch (measured with megatron-core 0.16.1, torch 2.13 CPU).
CPU_LIMITATION = (
    "megatron-core 0.16.1's DistributedOptimizer needs CUDA: MixedPrecisionOptimizer.__init__ allocates "
    "torch.tensor(..., device='cuda') (AssertionError: Torch not compiled with CUDA enabled) and it accepts only "
    "torch.cuda.*Tensor parameters"
)


def resolve_impl(impl: str, device: torch.device) -> str:
    """The optimizer a stage on ``device`` runs for ``train.optimizer_impl``.

    Args:
        impl: ``auto``, ``torch`` or ``megatron``.
        device: the stage's device.

    Returns:
        ``"megatron"`` (``DistributedAdam``) or ``"torch"`` (``MixedPrecisionOptimizer``).

    Raises:
        ValueError: ``megatron`` on a non-CUDA device, or an unknown value.
    """
    if impl == "auto":
        return "megatron" if device.type == "cuda" else "torch"
    if impl == "torch":
        return "torch"
    if impl == "megatron":
        if device.type != "cuda":
            raise ValueError(
                f"train.optimizer_impl=megatron needs CUDA stages, this stage runs on {device.type}: {CPU_LIMITATION}; "
                "use train.optimizer_impl=auto or torch"
            )
        return "megatron"
    raise ValueError(f"train.optimizer_impl={impl!r} is not one of auto, torch, megatron")


def ddp_config(train: TrainConfig) -> Any:
    """Megatron's ``DistributedDataParallelConfig``: fp32 grad buckets, reduce-scatter for the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=True,  # bucketed, asynchronous reduce-scatters
        use_distributed_optimizer=True,
        bucket_size=train.grad_bucket_size or None,
    )


def optimizer_config(train: TrainConfig, dtype: torch.dtype) -> Any:
    """Megatron's ``OptimizerConfig`` for AdamW with our hyper-parameters; Megatron never clips (``clip_grad=0``: the
    global clip coefficient comes from the driver) and never scales the loss (fp16: a constant scale of 1, the stage's
    own dynamic scaler divides it out in :meth:`DistributedAdam.reduce_grads`).
    """
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=train.lr,
        min_lr=train.min_lr,
        weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_eps=getattr(train, "adam_eps", 1e-8),
        clip_grad=0.0,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        loss_scale=1.0 if dtype == torch.float16 else None,
        params_dtype=dtype,
        use_distributed_optimizer=True,
    )


def transformer_config_of(module: torch.nn.Module) -> Any:
    """A copy of the first ``TransformerConfig`` found on ``module`` or its submodules, with
    ``calculate_per_token_loss=True`` so that DDP *sums* gradients over DP (we divide by the global token count).
    DDP reads nothing else of it that matters here, so a module without one (a user's plain-torch encoder) gets a
    one-layer stand-in.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    for sub in module.modules():
        config = getattr(sub, "config", None)
        if isinstance(config, TransformerConfig):
            out = copy.copy(config)  # no __post_init__ re-run
            out.calculate_per_token_loss = True
            return out
    return TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, calculate_per_token_loss=True)


def shard_ranges(gbuf_ranges: list[dict]) -> list[tuple[torch.nn.Parameter, int, int]]:
    """The shard of every bucket this DP rank owns, per parameter, from Megatron's range map.

    Args:
        gbuf_ranges: ``DistributedOptimizer.gbuf_ranges`` (one ``_build_gbuf_range_map`` result per buffer).

    Returns:
        ``(model parameter, start, end)``: the rank owns ``param.view(-1)[start:end]`` (and its gradient).
    """
    out = []
    for by_dtype in gbuf_ranges:
        for buckets in by_dtype.values():
            for bucket in buckets:
                for param, ranges in bucket["param_map"].items():
                    out.append((param, ranges["param"].start, ranges["param"].end))
    return out


def shard_sq_norm(shards: Iterable[tuple[torch.Tensor, int, int]], *, count_replicated: bool) -> float:
    """Share of the squared global grad norm held by this rank: its DP shard of each ``main_grad``, in float64.

    Summed over the DP ranks it is the squared norm of the reduced gradients (every element lies in exactly one
    shard); TP-sharded parameters count on every TP rank, replicated ones only where ``count_replicated``.

    Args:
        shards: ``(parameter, start, end)`` from :func:`shard_ranges`; the gradient is ``p.main_grad``.
        count_replicated: count parameters every TP rank holds in full (TP rank 0).

    Returns:
        Sum of squared gradient elements of the shard.
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for param, start, end in shards:
        if (count_replicated or is_tp_sharded(param)) and end > start:
            grad = param.main_grad.view(-1)[start:end]
            by_device.setdefault(grad.device, []).append(grad)
    parts: list[float] = []
    for grads in by_device.values():
        norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
        parts.extend(torch.stack(norms).pow(2).cpu().tolist())
    return math.fsum(parts)


def bucket_layout(buffers: Iterable[Any], names: dict[torch.nn.Parameter, str]) -> list[dict[str, Any]]:
    """Which parameters sit in which bucket: ``{"params": [names], "numel": unpadded, "padded": numel, "offset"}``
    per bucket of every ``_ParamAndGradBuffer``, in buffer order.
    """
    rows = []
    for buffer in buffers:
        for bucket in buffer.buckets:
            rows.append({"params": [names[p] for p in bucket.params_list], "numel": bucket.numel_unpadded,
                         "padded": bucket.grad_data.numel(), "offset": bucket.offset})
    return rows
