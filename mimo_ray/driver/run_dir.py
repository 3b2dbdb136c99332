"""Run-directory safety (DESIGN.md C12): a run never lands on, deletes or resumes another run's checkpoints unless told.

    check_output_dir(cfg)       # before Ray starts: refuse a fresh run over checkpoints, refuse an incompatible resume
    prepare_output_dir(cfg)     # in the loop: --overwrite removes old checkpoints; stale temporary dirs go

A run is identified by a ``run_id`` (a uuid) written to ``<output-dir>/run.json`` and into every checkpoint's
``driver.json``; a resumed run adopts the id of the checkpoint it resumed from, so its lineage continues.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import config_to_dict
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver.resume_rules import check_resume_config
from mimo_ray.parallel.imported_layout import is_imported

log = logging.getLogger("mimo_ray")
RUN_FILE = "run.json"


class RunDirError(ValueError):
    """The output directory cannot be used as asked (the message is one line, naming the directory and the ways out)."""


def ckpt_dir_of(cfg: Config) -> Path:
    """``<train.output_dir>/checkpoints``."""
    return Path(cfg.train.output_dir) / "checkpoints"


def existing_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Every ``step_<N>`` directory there, complete or not (a fresh run must not land on either)."""
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir()) if ckpt_dir.is_dir() else []


def check_output_dir(cfg: Config, *, log_changes: bool = False) -> dict[str, tuple[Any, Any]]:
    """Validate the run directory against the flags; reads files only (no Ray, no actors).

    Args:
        cfg: the resolved config.
        log_changes: log the allowed config changes of a resume (once per run, by the loop).

    Returns:
        The allowed config changes of a resume, ``{field: (old, new)}`` (empty for a fresh run).

    Raises:
        RunDirError: a fresh run (no ``--resume``/``--overwrite``) into a directory holding checkpoints.
        ValueError: ``--resume`` with a config that differs from the checkpoint's in a refused field.
    """
    root = ckpt_dir_of(cfg)
    found = existing_checkpoints(root)
    if found and not cfg.train.resume and not cfg.train.overwrite:
        raise RunDirError(
            f"--output-dir {cfg.train.output_dir!r} already holds checkpoints of another run ({found[-1].name} in "
            f"{root}); pass --resume to continue that run, or choose a new --output-dir (--overwrite discards them)"
        )
    if cfg.train.init_from and not (cfg.train.resume and ckpt.latest(root) is not None):
        from mimo_ray.driver.init_from import source_step

        source_step(cfg)  # the source exists and is not this run's own checkpoint (ValueError naming it)
    if not cfg.train.resume:
        return {}
    latest = ckpt.latest(root)
    if latest is None:
        return {}
    stored = json.loads((latest / "driver.json").read_text()).get("config")
    if stored is None:
        return {}
    neutral = is_imported(latest)  # a step-0 HF import: either runtime loads it
    return check_resume_config(stored, config_to_dict(cfg), str(latest), log_safe=log_changes, runtime_neutral=neutral)


def prepare_output_dir(cfg: Config) -> dict[str, tuple[Any, Any]]:
    """:func:`check_output_dir`, then act on it: ``--overwrite`` removes the old checkpoints; stale temporary dirs of
    crashed saves are removed.

    Returns:
        The allowed config changes of a resume.
    """
    changes = check_output_dir(cfg, log_changes=True)
    root = ckpt_dir_of(cfg)
    if cfg.train.overwrite and root.exists():
        old = existing_checkpoints(root)
        log.warning("--overwrite: removing %d checkpoint(s) of a previous run in %s", len(old), root)
        shutil.rmtree(root)
    ckpt.remove_stale_tmp(root)
    return changes


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex


def write_run_file(
    output_dir: Path, run_id: str, resumed_from: str | None, init_from: dict[str, Any] | None = None
) -> Path:
    """``<output-dir>/run.json``: the run id, where this process started it from and the weights it started with
    (``init_from``: ``{"checkpoint", "modules"}`` of ``train.init_from``, or ``None``).
    """
    path = Path(output_dir) / RUN_FILE
    record = {"run_id": run_id, "resumed_from": resumed_from, "init_from": init_from, "started_unix": time.time()}
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def start_sample(state: dict[str, Any] | None, cfg: Config) -> int:
    """The data position to resume at: the checkpoint's recorded ``samples_consumed``.

    Checkpoints written before it was recorded fall back to ``step * data.global_batch_size``; a fresh start is 0.
    """
    if state is None:
        return 0
    if "samples_consumed" in state:
        return int(state["samples_consumed"])
    return int(state["step"]) * cfg.data.global_batch_size
