"""Atomic checkpoints (DESIGN.md C6): ``ckpt_dir/step_<N>/`` is written under a temporary name and renamed when
complete; ``latest`` names the newest complete one. Loading never unpickles arbitrary objects.

Layout of one checkpoint::

    step_<N>/driver.json      step, data cursor, resolved config, tokenizer + chat template + special tokens
    step_<N>/driver_rng.pt    the driver's RNG state (a tensor; loaded with weights_only=True)
    step_<N>/<group files>    written by every stage rank itself (model + optimizer state)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
COMPLETE = "COMPLETE"


def step_dir(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Final directory of the checkpoint taken after ``step`` optimizer steps."""
    return Path(ckpt_dir) / f"step_{step:07d}"


def begin(ckpt_dir: str | os.PathLike, step: int) -> Path:
    """Create and return a fresh temporary directory for the checkpoint of ``step``."""
    tmp = Path(ckpt_dir) / f".tmp-step_{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_driver_state(tmp: Path, state: dict[str, Any]) -> None:
    """Write the driver's JSON state and RNG into a checkpoint being built."""
    (tmp / "driver.json").write_text(json.dumps(state, indent=1, sort_keys=True))
    torch.save({"torch_rng": torch.get_rng_state()}, tmp / "driver_rng.pt")


def commit(ckpt_dir: str | os.PathLike, tmp: Path, step: int, keep: int = 3) -> Path:
    """Mark ``tmp`` complete, rename it to ``step_<N>`` and point ``latest`` at it; keep the newest ``keep``.

    Returns:
        The final checkpoint directory.
    """
    (tmp / COMPLETE).write_text("ok\n")
    final = step_dir(ckpt_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = Path(ckpt_dir) / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, Path(ckpt_dir) / LATEST)
    complete = sorted(p for p in Path(ckpt_dir).glob("step_*") if (p / COMPLETE).exists())
    for old in complete[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or ``None``. A torn ``latest`` falls back to the newest complete dir."""
    root = Path(ckpt_dir)
    pointer = root / LATEST
    if pointer.exists():
        cand = root / pointer.read_text().strip()
        if (cand / COMPLETE).exists():
            return cand
    complete = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def resolve(path: str | os.PathLike) -> Path:
    """A checkpoint path given as a run dir, a ckpt dir or a step dir → the complete step dir.

    Raises:
        ValueError: naming the path when no complete checkpoint is there.
    """
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    for root in (path, path / "checkpoints"):
        found = latest(root) if root.exists() else None
        if found is not None:
            return found
    raise ValueError(f"no complete checkpoint at {str(path)!r} (expected step_*/COMPLETE or a 'latest' pointer)")


def read_driver_state(ckpt: Path) -> dict[str, Any]:
    """The driver state of a complete checkpoint; restores the driver RNG."""
    state = json.loads((ckpt / "driver.json").read_text())
    rng = torch.load(ckpt / "driver_rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch_rng"])
    return state
