"""The imported-weights layout inside a step-0 checkpoint, and how any stage reads its share of it.

``jobs/convert.py import`` cannot know which runtime will train (fused, or encoder groups split per modality), so
it writes one file per model part under ``step_0000000/imported/``, keyed like the fused model::

    imported/manifest.json                          {"lm_tp": 2, "parts": ["video", "audio", "language_model"], ...}
    imported/modality_submodules.<modality>.pt      one encoder (projections are not imported)
    imported/language_model.tp<r>.pt                LM tensor-parallel rank r's slice

A stage loads the parts its module holds (an LM rank only its own slice; a TP=1 stage joins the slices with the
stride rule); parameters of parts that were not imported (projections, output decoders, an encoder without a source
directory) keep their seeded initialisation, identical in every runtime. There is no optimizer state at step 0.

``train.init_from`` (``mimo_ray/driver/init_from.py``) writes the same layout from another run's checkpoint, with
``roots`` in the manifest (``{part: fused-name prefix}``, e.g. ``video.input_projections`` →
``modality_submodules.video.input_projections.``) and the LM as one full ``language_model.tp0.pt`` (``lm_tp: 1``)
that every LM rank of any TP size slices for itself.

Part files hold either layer layout (local or transformer-engine norm names, the manifest's ``lm_layout``); a stage
gets its share renamed to the layout its module was built with (:mod:`mimo_ray.parallel.layer_layout`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mimo_ray.parallel.layer_layout import match_module
from mimo_ray.parallel.tp_shards import shard, unshard

IMPORTED = "imported"
MANIFEST = "manifest.json"
LM_PART = "language_model"


def part_file(step_dir: str | Path, part: str, tp_rank: int | None = None) -> Path:
    """File of one part: ``modality_submodules.<m>.pt`` or ``language_model.tp<r>.pt``."""
    name = f"{LM_PART}.tp{tp_rank}.pt" if part == LM_PART else f"modality_submodules.{part}.pt"
    return Path(step_dir) / IMPORTED / name


def is_imported(step_dir: str | Path) -> bool:
    """Whether a checkpoint holds imported weights (and no per-runtime model files)."""
    return (Path(step_dir) / IMPORTED / MANIFEST).is_file()


def read_manifest(step_dir: str | Path) -> dict[str, Any]:
    """The manifest :func:`write_manifest` wrote."""
    return json.loads((Path(step_dir) / IMPORTED / MANIFEST).read_text())


def write_manifest(step_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Write the manifest (last, after every part file)."""
    (Path(step_dir) / IMPORTED / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def lm_tp_layout(key: str, swiglu: bool) -> tuple[int, int] | None:
    """``(partition dim, stride)`` of one of our LM keys under tensor parallelism, ``None`` when replicated."""
    if key.endswith(("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")):
        return 0, 1
    if key.endswith(("linear_fc1.weight", "linear_fc1.bias")):
        return 0, 2 if swiglu else 1
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return 1, 1
    return None


def part_root(manifest: dict[str, Any], part: str) -> str:
    """The fused-name prefix of a part's tensors (``roots`` in the manifest, else the import's convention)."""
    roots = manifest.get("roots") or {}
    if part in roots:
        return roots[part]
    return f"{LM_PART}." if part == LM_PART else f"modality_submodules.{part}.encoders."


def lm_layouts(manifest: dict[str, Any]) -> dict[str, list[int]]:
    """``{LM key: [partition dim, stride]}`` of the LM's tensor-parallel parameters, as recorded at import."""
    return manifest.get("lm_tp_layout", {})


VOCAB_KEYS = ("word_embeddings.weight", "output_layer.weight")


def fit_vocab_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """A vocabulary table padded for another TP size → ``rows`` rows (only all-zero padding rows are dropped)."""
    have = table.shape[0]
    if have == rows:
        return table
    if have > rows:
        return table[:rows] if not table[rows:].any() else table
    return torch.cat([table, table.new_zeros(rows - have, *table.shape[1:])])


def _load(file: Path) -> dict[str, torch.Tensor]:
    return torch.load(file, map_location="cpu", weights_only=True, mmap=True)


def imported_state(step_dir: str | Path, module_keys: list[str], prefix: str, tp_rank: int, tp: int,
                   vocab_rows: int | None = None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The imported tensors a stage's module holds.

    Args:
        step_dir: the checkpoint.
        module_keys: the module's state-dict keys.
        prefix: what maps a module key onto the fused model's name (``modality_submodules.`` for encoder stages).
        tp_rank: the stage's tensor-parallel rank.
        tp: the stage's tensor-parallel size (1: the LM slices are joined).
        vocab_rows: the whole (all ranks) padded vocabulary of this model, to fit a full LM's tables to before
            slicing them (``None``: the table's rows rounded up to a multiple of ``tp``).

    Returns:
        ``(state keyed like the module, module keys that a covered part must provide)``.

    Raises:
        ValueError: the LM was imported for another tensor-parallel size, or a part file is missing.
    """
    manifest = read_manifest(step_dir)
    fused_keys = {prefix + k for k in module_keys}
    state: dict[str, torch.Tensor] = {}
    required: set[str] = set()
    for part in manifest["parts"]:
        root = part_root(manifest, part)
        if not any(k.startswith(root) for k in fused_keys):
            continue
        required |= {k[len(prefix):] for k in fused_keys if k.startswith(root) and not k.endswith("_extra_state")}
        if part != LM_PART:
            full = _load(part_file(step_dir, part))
        elif tp == manifest["lm_tp"]:
            full = _load(part_file(step_dir, part, tp_rank))
        elif tp == 1:
            shards = [_load(part_file(step_dir, part, r)) for r in range(manifest["lm_tp"])]
            layout = lm_layouts(manifest)
            full = {
                k: unshard([s[k] for s in shards], *layout[k]) if k in layout else shards[0][k] for k in shards[0]
            }
        elif manifest["lm_tp"] == 1:  # a full LM (train.init_from): this rank's slice; vocab rows fitted first
            layout = lm_layouts(manifest)
            full = {}
            for key, value in _load(part_file(step_dir, part, 0)).items():
                if key in layout:
                    if key.endswith(VOCAB_KEYS):
                        value = fit_vocab_rows(value, vocab_rows or -(-value.shape[0] // tp) * tp)
                    value = shard(value, tp, tp_rank, *layout[key])
                full[key] = value
        else:
            raise ValueError(
                f"checkpoint {step_dir}: the LM was imported for parallel.lm_tp={manifest['lm_tp']}, this run uses "
                f"parallel.lm_tp={tp}; import it again with --parallel.lm_tp={tp}"
            )
        for key, value in full.items():
            if not key.startswith(prefix) or not key.startswith(root):
                continue
            state[key[len(prefix):]] = value
    return match_module(state, module_keys), required


def load_imported(module: torch.nn.Module, step_dir: str | Path, prefix: str, tp_rank: int, tp: int) -> None:
    """Load the imported parts into ``module`` (weights only).

    Raises:
        ValueError: a tensor of an imported part is missing, unexpected or of another shape, naming it.
    """
    own = module.state_dict()
    keys = list(own)
    vocab = [own[k].shape[0] * tp for k in keys if k.endswith(VOCAB_KEYS)]
    state, required = imported_state(step_dir, keys, prefix, tp_rank, tp, vocab[0] if vocab else None)
    missing = sorted(required - set(state))
    unexpected = sorted(set(state) - set(keys))
    if missing or unexpected:
        raise ValueError(f"imported checkpoint {step_dir}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if key.endswith(VOCAB_KEYS):
            state[key] = value = fit_vocab_rows(value, own[key].shape[0])
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"imported checkpoint {step_dir}: {prefix}{key} has shape {list(value.shape)}, the model expects "
                f"{list(own[key].shape)}"
            )
    module.load_state_dict(state, strict=False)
