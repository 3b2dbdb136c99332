"""Learning-rate schedule: linear warm-up then cosine decay to ``min_lr``."""

from __future__ import annotations

import math

from mimo_ray.config import TrainConfig


def lr_at(train: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Args:
        train: ``lr``, ``min_lr``, ``warmup_steps``, ``max_steps``.
        step: the step about to run.

    Returns:
        ``lr * (step + 1) / warmup_steps`` during warm-up, then cosine from ``lr`` to ``min_lr`` at ``max_steps``.
    """
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    span = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    return train.min_lr + 0.5 * (train.lr - train.min_lr) * (1.0 + math.cos(math.pi * progress))
