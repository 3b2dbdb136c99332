"""Which config changes a resumed run may make: the one place that says so.

A checkpoint stores the resolved config it was trained with. Resuming compares it with the current one field by
field (dotted paths). A field listed in :data:`SAFE_ON_RESUME` (or under a prefix listed there) may change: the change
is logged and reported. Every other difference is refused, naming the fields: the model's shape, the data (paths,
order, batch size, tokenizer, seeds), the runtime and the encoder grouping all decide what a checkpoint holds or which
samples come next. Deny is the default, so a new config field is refused on resume until it is listed here.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import config_to_dict

log = logging.getLogger("mimo_ray")

# Fields (or ``section.`` prefixes) a resumed run may change. Each leaves the checkpoint's tensors loadable and the
# order of the training samples unchanged.
SAFE_ON_RESUME: tuple[str, ...] = (
    # how long and how fast: the lr schedule and the clip norm are read from the config every step (AdamW's betas
    # and weight decay are not: the optimizer state loaded from the checkpoint restores them, so they are refused)
    "train.max_steps",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.grad_clip",
    # checkpoints, evaluation, recovery, where the run lives and how it was started
    "train.ckpt_interval",
    "train.keep_checkpoints",
    "train.eval_interval",
    "train.eval_batches",
    "train.max_failures",
    "train.step_timeout_s",
    "train.recovery_timeout_s",
    "train.output_dir",
    "data.val_path",
    # decode throughput and robustness knobs: they do not reorder samples
    "data.num_decode_workers",
    "data.decode_timeout_s",
    "data.decode_retries",
    "data.max_bad_fraction",
    # placement and performance knobs that change no tensor's meaning (layout sizes and devices stay refused);
    # torch_num_threads may change floats in the last bits, as resuming on another CPU does
    "parallel.cpus_per_actor",
    "parallel.gpus_per_actor",
    "parallel.placement_timeout_s",
    "parallel.encoder_resources",
    "parallel.lm_resources",
    "parallel.decoder_resources",
    "parallel.prefetch_microbatches",
    "parallel.transport",
    "parallel.decode_resource",
    # the DP/TP layout: stage ranks reshard a checkpoint written with another TP size (stages/reshard.py), DP ranks
    # hold replicas, and the sample order does not depend on either (resume on a smaller or larger cluster)
    "parallel.encoder_dp",
    "parallel.lm_dp",
    "parallel.lm_tp",
    "parallel.lm_micro_batch_size",
    "parallel.torch_num_threads",
    "model.recompute",
    # staged training (LLaVA stage 1 -> stage 2): optimizer state is reloaded by parameter name, newly trained parts
    # start with fresh moments
    "model.freeze",
    # where a run's weights came from at step 0: a resumed run loads its own checkpoint, never init_from again
    "train.init_from",
    "train.init_from_modules",
    # sections a training run does not read, and the preset label (its fields are compared one by one)
    "infer.",
    "cluster.",
    "preset",
)

# Refused on purpose (not listed above), among others: train.optimizer_impl and train.grad_bucket_size decide what
# a checkpoint's optimizer state is (replicated per-parameter AdamW state vs Megatron DistributedOptimizer shards of
# the DP grad-bucket layout); the stages also check the resolved implementation stored with the state.

# How a run was started, not what it trains: neither refused nor reported.
START_FLAGS: tuple[str, ...] = ("train.resume", "train.overwrite")


def is_safe(field: str) -> bool:
    """Whether ``field`` (a dotted path) may differ between a checkpoint and the run resuming from it."""
    return any(field == s or (s.endswith(".") and field.startswith(s)) for s in SAFE_ON_RESUME)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        # resource maps and special-token tables are values, not sections
        if isinstance(value, dict) and not path.endswith(("_resources", "special_token_ids")):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


@cache
def _defaults() -> dict[str, Any]:
    return _flatten(config_to_dict(Config()))


def config_changes(stored: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{field: (stored value, current value)}`` of every leaf that differs.

    The start flags (:data:`START_FLAGS`) are left out. A field the stored config lacks (written by code that did not
    have it yet) compares as its schema default; a field the current schema no longer has compares as absent.
    """
    old, new = {**_defaults(), **_flatten(stored)}, _flatten(current)
    keys = sorted((old.keys() | new.keys()) - set(START_FLAGS))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


#: Also allowed when the checkpoint holds no per-runtime files (a step-0 import from HuggingFace directories, which
#: both runtimes load).
SAFE_FOR_RUNTIME_NEUTRAL: tuple[str, ...] = ("train.runtime",)


def check_resume_config(
    stored: dict[str, Any], current: dict[str, Any], where: str, *, log_safe: bool = True,
    runtime_neutral: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Refuse an incompatible config on resume; log the safe changes.

    Args:
        stored: the config recorded in the checkpoint (``driver.json["config"]``).
        current: the config of the run resuming (``config_to_dict(cfg)``).
        where: the checkpoint, for the messages.
        log_safe: log each allowed change at INFO (``field: old -> new``).
        runtime_neutral: the checkpoint loads in either runtime (:data:`SAFE_FOR_RUNTIME_NEUTRAL` may change too).

    Returns:
        The allowed changes, ``{field: (old, new)}``.

    Raises:
        ValueError: one line naming every refused field with both values.
    """
    changes = config_changes(stored, current)
    extra = SAFE_FOR_RUNTIME_NEUTRAL if runtime_neutral else ()
    refused = {k: v for k, v in changes.items() if not is_safe(k) and k not in extra}
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ValueError(
            f"cannot resume from {where}: the config differs in fields that change the model or the data order: "
            f"{listed}; resume with the checkpoint's values or start a new run in a new --output-dir"
        )
    if log_safe:
        for key, (old, new) in changes.items():
            log.info("resume from %s: %s changed %r -> %r (allowed)", where, key, old, new)
    return changes
