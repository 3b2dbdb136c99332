"""Staged training as LLaVA does it: a NEW run starts from another run's weights (``train.init_from``).

    python jobs/train.py --config ... --init-from runs/stage1 --data-path D/instruct.json --lr 2e-5
    python jobs/train.py --config ... --init-from runs/stage1 --init-from-modules=[projections]

The new run gets its own run id, starts at step 0 with a fresh optimizer, LR schedule and data position; only the
weights come from the source. The source may be a run directory, its ``checkpoints/`` folder or one ``step_<N>``,
written by either runtime (fused or disaggregated, encoder groups shared or per modality) with any LM TP size, or a
step-0 Hugging Face import. :func:`prepare_init` gathers its tensors under the fused model's names, keeps the
requested modules (``train.init_from_modules``: ``vision``, ``audio``, ``projections``, ``lm``, ``decoders``; empty =
all), and writes them in the imported-weights layout (:mod:`mimo_ray.parallel.imported_layout`) under
``<output-dir>/init_from/step_0000000/``; every stage then loads its share of it like a step-0 import (weights only,
each LM rank its own slice, shape checks naming the tensor). Parts not taken keep their seeded initialisation.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.config_cli import config_from_dict
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.model.freeze import part_of
from mimo_ray.parallel import imported_layout as layout
from mimo_ray.parallel.tp_shards import unshard

log = logging.getLogger("mimo_ray")

INIT_DIR = "init_from"
#: Checkpoint role (``<role>/tp<r>.pt``, the part before ``-``) → the prefix that gives its keys fused names.
ROLE_PREFIX = {"encoder": "modality_submodules.", "fused": "", "lm": "", "decoders": "output_decoders."}


def checkpoint_full_state(step: Path, swiglu: bool) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint under the fused model's names, LM TP shards joined (memory-mapped).

    Args:
        step: a complete ``step_<N>`` directory (any runtime, any TP size, or a step-0 import).
        swiglu: whether the LM's ``linear_fc1`` holds SwiGLU's interleaved ``[gate; up]`` halves.

    Raises:
        ValueError: the checkpoint holds no model files.
    """
    state: dict[str, torch.Tensor] = {}
    if layout.is_imported(step):
        manifest = layout.read_manifest(step)
        for part in manifest["parts"]:
            if part != layout.LM_PART:
                state.update(torch.load(layout.part_file(step, part), weights_only=True, mmap=True))
        if layout.LM_PART in manifest["parts"]:
            shards = [torch.load(layout.part_file(step, layout.LM_PART, r), weights_only=True, mmap=True)
                      for r in range(manifest["lm_tp"])]  # fmt: skip
            state.update(_join(shards, swiglu))
        return state
    files = sorted(step.glob("*/tp*.pt"))
    if not files:
        raise ValueError(f"checkpoint {str(step)!r} holds no model files (<role>/tp<k>.pt or imported/)")
    lm_shards: dict[int, dict[str, torch.Tensor]] = {}
    for file in files:
        role = file.parent.name.split("-")[0]
        model = torch.load(file, map_location="cpu", weights_only=True, mmap=True)["model"]
        if role == "lm":
            lm_shards[int(file.stem[2:])] = model
        elif role in ROLE_PREFIX:
            state.update({ROLE_PREFIX[role] + k: v for k, v in model.items()})
    if lm_shards:
        state.update(_join([lm_shards[r] for r in sorted(lm_shards)], swiglu))
    return state


def _join(shards: list[dict[str, torch.Tensor]], swiglu: bool) -> dict[str, torch.Tensor]:
    if len(shards) == 1:
        return dict(shards[0])
    out = {}
    for key, value in shards[0].items():
        where = layout.lm_tp_layout(key, swiglu)
        out[key] = unshard([s[key] for s in shards], *where) if where else value
    return out


def module_of(key: str) -> str:
    """The ``train.init_from_modules`` name of a fused-model tensor (``decoders`` for output decoders)."""
    return part_of(key) or "decoders"


def _part(key: str) -> tuple[str, str]:
    """``(part name, fused-name root)`` a tensor is stored under in the init layout."""
    if key.startswith(f"{layout.LM_PART}."):
        return layout.LM_PART, f"{layout.LM_PART}."
    parts = key.split(".")
    if parts[0] == "modality_submodules" and len(parts) > 3:
        return f"{parts[1]}.{parts[2]}", f"modality_submodules.{parts[1]}.{parts[2]}."
    return parts[0], f"{parts[0]}."


def source_step(cfg: Config) -> Path:
    """The complete checkpoint ``train.init_from`` names.

    Raises:
        ValueError: no complete checkpoint there, or it lies in this run's own checkpoints.
    """
    step = ckpt.resolve(cfg.train.init_from)
    own = (Path(cfg.train.output_dir) / "checkpoints").resolve()
    if step.resolve().is_relative_to(own):
        raise ValueError(
            f"train.init_from={cfg.train.init_from!r} is a checkpoint of this run's own --output-dir "
            f"{cfg.train.output_dir!r}; continue it with --resume, or start the new run in another --output-dir"
        )
    return step


def prepare_init(cfg: Config) -> Path:
    """Write the source's selected weights in the imported layout inside the new run's folder.

    Returns:
        ``<output-dir>/init_from/step_0000000`` (what every stage's ``load`` reads).

    Raises:
        ValueError: no checkpoint at ``train.init_from``, or a requested module it does not hold (naming both).
    """
    step = source_step(cfg)
    stored = json.loads((step / "driver.json").read_text()).get("config") or {}
    src_cfg = config_from_dict(stored) if stored else cfg
    state = checkpoint_full_state(step, src_cfg.model.lm.swiglu)
    wanted = set(cfg.train.init_from_modules) or {module_of(k) for k in state}
    have = {module_of(k) for k in state}
    missing = sorted(wanted - have)
    if missing:
        raise ValueError(
            f"train.init_from_modules={sorted(wanted)}: the checkpoint {str(step)!r} holds no {missing} weights "
            f"(it holds {sorted(have)})"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    roots: dict[str, str] = {}
    for key, value in state.items():
        if module_of(key) in wanted and not key.endswith("_extra_state") and isinstance(value, torch.Tensor):
            part, root = _part(key)
            parts.setdefault(part, {})[key] = value
            roots[part] = root
    out = Path(cfg.train.output_dir) / INIT_DIR / ckpt.step_dir(".", 0).name
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / layout.IMPORTED).mkdir(parents=True)
    for part, tensors in parts.items():
        torch.save(tensors, layout.part_file(tmp, part, 0 if part == layout.LM_PART else None))
    lm_keys = parts.get(layout.LM_PART, {})
    tp_layout = {k: list(w) for k in lm_keys if (w := layout.lm_tp_layout(k, src_cfg.model.lm.swiglu))}
    layout.write_manifest(tmp, {"lm_tp": 1, "parts": sorted(parts), "roots": roots, "lm_tp_layout": tp_layout,
                                "init_from": str(step), "modules": sorted(wanted)})  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    counts = {m: sum(1 for k in state if module_of(k) == m) for m in sorted(wanted)}
    log.info("init from %s: %s tensors per module -> %s", step, counts, out)
    return out


def init_record(init_dir: Path) -> dict[str, Any]:
    """What the summary and ``run.json`` record about the weights a run started from."""
    manifest = layout.read_manifest(init_dir)
    return {"checkpoint": manifest["init_from"], "modules": manifest["modules"]}
