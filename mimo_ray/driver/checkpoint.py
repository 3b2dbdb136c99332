"""Atomic, durable checkpoints (DESIGN.md C6): ``ckpt_dir/step_<N>/`` is written under a temporary name, every file
and directory in it is fsynced, then it is renamed when complete; ``latest`` names the newest complete one. Loading
never unpickles arbitrary objects.

Each checkpoint records the ``run_id`` of the run that wrote it (C12): retention and recovery only ever touch the
checkpoints of one run, so another run's checkpoints in the same directory are never deleted or loaded.

Layout of one checkpoint::

    step_<N>/driver.json      step, run_id, samples_consumed, resolved config, tokenizer + chat template + tokens
    step_<N>/driver_rng.pt    the driver's RNG state (a tensor; loaded with weights_only=True)
    step_<N>/<group files>    written by every stage rank itself (model + optimizer state)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp-step_"

log = logging.getLogger("mimo_ray")


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Final directory of the checkpoint taken after ``step`` optimizer steps."""
    return Path(ckpt_dir) / f"step_{step:07d}"


def step_of(path: Path) -> int:
    """The step number in a ``step_<N>`` directory name."""
    return int(path.name.split("_", 1)[1])


def begin(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Create and return a fresh temporary directory for the checkpoint of ``step``."""
    tmp = Path(ckpt_dir) / f"{TMP_PREFIX}{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_driver_state(tmp: Path, state: dict[str, Any]) -> None:
    """Write the driver's JSON state and RNG into a checkpoint being built."""
    (tmp / "driver.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "driver_rng.pt")


def _fsync_path(path: Path) -> None:
    """Fsync one file or directory (a directory's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Fsync every file under ``root`` (the driver's and the stage ranks'), then every directory, deepest first."""
    dirs = []
    for parent, _, files in os.walk(root):
        dirs.append(Path(parent))
        for name in files:
            _fsync_path(Path(parent) / name)
    for directory in reversed(dirs):
        _fsync_path(directory)


def _durable_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` over ``dst`` and fsync the parent so the rename itself survives a crash."""
    os.replace(src, dst)
    _fsync_path(dst.parent)


def is_complete(path: Path) -> bool:
    """Whether ``path`` is a committed checkpoint."""
    return (path / COMPLETE).exists()


def run_id_of(path: Path) -> str | None:
    """The ``run_id`` recorded in a checkpoint (``None`` for checkpoints written before run ids existed)."""
    try:
        return json.loads((path / "driver.json").read_text()).get("run_id")
    except (OSError, ValueError):
        return None


def checkpoints(ckpt_dir: str | os.PathLike, run_id: str | None = None, *, any_run: bool = True) -> list[Path]:
    """Complete ``step_<N>`` checkpoints in step order; with ``any_run=False`` only those of ``run_id``."""
    root = Path(ckpt_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and is_complete(p)]
    if not any_run:
        found = [p for p in found if run_id_of(p) == run_id]
    return sorted(found, key=step_of)


def commit(ckpt_dir: str | os.PathLike, tmp: Path, step: int, keep: int = 3, run_id: str | None = None) -> Path:
    """Make ``tmp`` durable, rename it to ``step_<N>``, point ``latest`` at it and keep this run's newest ``keep``.

    Every file and directory of ``tmp`` is fsynced before the rename, and the parent after it. Retention counts only
    checkpoints whose recorded ``run_id`` equals ``run_id``, by step order, and never removes the one just written.

    Args:
        ckpt_dir: the checkpoint directory.
        tmp: the directory from :func:`begin`, holding every group's files and ``driver.json``.
        step: optimizer steps taken.
        keep: checkpoints of this run to keep (0: all).
        run_id: the run writing it (as recorded in its ``driver.json``).

    Returns:
        The final checkpoint directory.

    Raises:
        RuntimeError: ``step_<N>`` already exists and belongs to another run (it is never replaced).
    """
    root = Path(ckpt_dir)
    (tmp / COMPLETE).write_text("ok\n")
    fsync_tree(tmp)
    final = step_dir(root, step)
    if final.exists():
        other = run_id_of(final)
        if is_complete(final) and other != run_id:
            raise RuntimeError(
                f"checkpoint {final} belongs to run {other!r}, not to this run {run_id!r}; refusing to replace "
                f"another run's checkpoint (two runs share --output-dir {root.parent})"
            )
        shutil.rmtree(final)
    _durable_replace(tmp, final)
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    _fsync_path(pointer)
    _durable_replace(pointer, root / LATEST)
    mine = [p for p in checkpoints(root, run_id, any_run=False) if p != final]
    for old in mine[: max(len(mine) - (keep - 1), 0)] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_dir: str | os.PathLike, run_id: str | None = None, *, any_run: bool = True) -> Path | None:
    """The newest complete checkpoint, or ``None``. A torn ``latest`` falls back to the newest complete dir.

    Args:
        ckpt_dir: the checkpoint directory.
        run_id: with ``any_run=False``, only checkpoints recorded with this run id count (recovery).
        any_run: consider every checkpoint (a ``--resume`` or inference picks up whatever run is there).
    """
    root = Path(ckpt_dir)
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if is_complete(cand) and (any_run or run_id_of(cand) == run_id):
            return cand
    complete = checkpoints(root, run_id, any_run=any_run)
    return complete[-1] if complete else None


def remove_stale_tmp(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary directories (and pointer) that crashed saves left behind; returns what was removed."""
    root = Path(ckpt_dir)
    stale = sorted(root.glob(f"{TMP_PREFIX}*")) + sorted(root.glob(f".{LATEST}.tmp"))
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d stale temporary checkpoint(s) of crashed saves: %s", len(stale),
                    ", ".join(p.name for p in stale))  # fmt: skip
    return stale


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint path given as a run dir, a ckpt dir or a step dir → the complete step dir.

    Raises:
        ValueError: naming the path when no complete checkpoint is there.
    """
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root) if root.exists() else None
        if found is not None:
            return found
    raise ValueError(f"no complete checkpoint at {str(path)!r} (expected step_*/COMPLETE or a 'latest' pointer)")


def driver_state(ckpt: Path) -> dict[str, Any]:
    """The driver state (``driver.json``) of a complete checkpoint."""
    return json.loads((ckpt / "driver.json").read_text())


def restore_driver_rng(ckpt: Path) -> None:
    """Set the driver's torch RNG to the state the checkpoint recorded."""
    rng = torch.load(ckpt / "driver_rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
