"""Pick the data source of a split: output tasks or the manifest pipeline when a path is configured, else random
batches.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mimo_ray.config import Config
from mimo_ray.data.random_stream import RandomDataSource


def build_data_source(  # noqa: ANN201 - duck-typed sources
    cfg: Config, split: str, start_sample: int = 0, data_state: dict[str, Any] | None = None
):
    """A data source for ``split`` (``train`` or ``val``) positioned after ``start_sample`` samples.

    Sources offer ``next_step()`` (micro-batches of one optimizer step, pulled by the driver for the fused
    runtime), ``rank_streams(n)`` (one iterable per encoder rank, pulled by the actors), ``advance(steps)``,
    ``quarantined`` and ``close()``.

    Args:
        cfg: the config.
        split: ``train`` or ``val``.
        start_sample: samples already consumed.
        data_state: the ``data_state`` a checkpoint's ``driver.json`` holds (written by the manifest source's
            ``checkpoint_extras()``), or ``None``. Manifest sources restore their bad-row memory and exact plan
            position from it; the other sources have no such state and ignore it.
    """
    path = cfg.data.data_path if split == "train" else cfg.data.val_path
    if path is None:
        if split != "train":
            # A different seed so "validation" batches are not the training ones.
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
        return RandomDataSource(cfg, start_sample)
    from mimo_ray.data.output_source import OutputTaskSource, is_output_manifest

    if is_output_manifest(path):
        return OutputTaskSource(cfg, split, start_sample=start_sample)
    from mimo_ray.data.pipeline import ManifestDataSource
    from mimo_ray.runtime.placement import stage_cpu_reservation

    return ManifestDataSource(cfg, split, start_sample=start_sample, data_state=data_state,
                              reserved_cpus=stage_cpu_reservation(cfg))  # fmt: skip
