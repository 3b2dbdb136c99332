"""What travels between stages: packing of tensor trees, and per-sample slicing of batch-major embedding rows.

Shapes: ``B`` samples, ``S`` sequence, ``N`` embedding rows of one modality (all rows of sample 0, then sample 1, …),
``H`` LM width. A sample ``b`` owns the rows ``offsets[b]:offsets[b+1]`` where ``offsets`` is the cumulative count of
that modality's placeholder tokens per sample, so samples may have different row counts.

Two payload formats:
- ``numpy``: tensors become numpy arrays, which Ray's object store hands over without pickling copies;
- ``torch``: tensors stay tensors on the stage's device (Ray Direct Transport: NCCL / CUDA IPC).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from mimo_ray.model.align import count_mismatch

# Keys of a C1 batch that the LM needs besides the embeddings; all are ``[B, S]``.
TOKEN_KEYS = ("input_ids", "position_ids", "labels", "loss_mask")
PAYLOAD_FORMATS = ("numpy", "torch")


def pack(tree: Any, fmt: str) -> Any:
    """Prepare a (nested dict/list of) tensors for another process.

    Args:
        tree: tensors in dicts, lists or tuples; other leaves pass through.
        fmt: ``numpy`` (host arrays, zero-copy through the object store) or ``torch`` (tensors as they are).

    Returns:
        The same structure with tensors converted. bf16 has no numpy dtype and stays a CPU tensor.
    """
    if isinstance(tree, dict):
        return {k: pack(v, fmt) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(pack(v, fmt) for v in tree)
    if isinstance(tree, torch.Tensor):
        tensor = tree.detach()
        if fmt == "torch":
            return tensor
        if tensor.dtype == torch.bfloat16:
            return tensor.cpu()
        return tensor.cpu().numpy()
    return tree


def unpack(tree: Any, device: torch.device | str = "cpu") -> Any:
    """Inverse of :func:`pack`: numpy arrays (read-only views of the object store) become owned tensors.

    Args:
        tree: a packed structure.
        device: where the tensors should live.

    Returns:
        The structure with torch tensors on ``device``.
    """
    if isinstance(tree, dict):
        return {k: unpack(v, device) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(unpack(v, device) for v in tree)
    if isinstance(tree, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # non-writable arrays: we copy below when needed
            tensor = torch.from_numpy(tree if tree.flags.writeable else tree.copy())
        return tensor.to(device)
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    return tree


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a C1 batch (rows of ``input_ids``)."""
    return int(batch["input_ids"].shape[0])


def rows_per_sample(input_ids_BS: torch.Tensor, token_id: int) -> list[int]:
    """Placeholder count of one modality in each sample.

    Args:
        input_ids_BS: ``[B, S]`` token ids.
        token_id: the modality's special token id.

    Returns:
        ``B`` counts: the embedding rows each sample owns.
    """
    return (input_ids_BS == token_id).sum(dim=1).tolist()


def row_offsets(counts: list[int]) -> list[int]:
    """``[0, c0, c0+c1, …]``: the first row of each sample, plus the total at the end."""
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + int(count))
    return offsets


def check_rows(name: str, emb_NH: torch.Tensor, counts: list[int]) -> None:
    """Raise when a modality's embedding rows differ from its placeholder tokens (C2).

    Raises:
        ValueError: naming the modality and both counts.
    """
    if emb_NH.shape[0] != sum(counts):
        raise ValueError(count_mismatch(name, counts, emb_NH.shape[0]))


def slice_samples(
    emb: dict[str, torch.Tensor], input_ids_BS: torch.Tensor, special_token_ids: dict[str, int], start: int, stop: int
) -> dict[str, torch.Tensor]:
    """The rows of samples ``start:stop`` of every modality.

    Args:
        emb: ``{modality: [N, H]}`` batch-major rows of the whole batch.
        input_ids_BS: ``[B, S]`` ids of the whole batch (placeholders say who owns which rows).
        special_token_ids: ``{modality: id}``.
        start: first sample.
        stop: one past the last sample.

    Returns:
        ``{modality: [N_slice, H]}`` views.

    Raises:
        ValueError: when a modality's rows and placeholders disagree.
    """
    out = {}
    for name, rows in emb.items():
        counts = rows_per_sample(input_ids_BS, special_token_ids[name])
        check_rows(name, rows, counts)
        offsets = row_offsets(counts)
        out[name] = rows[offsets[start] : offsets[stop]]
    return out


def concat_rows(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join per-piece ``{modality: [N_i, H]}`` in piece (= sample) order into ``{modality: [sum N_i, H]}`` copies."""
    names: list[str] = []
    for piece in pieces:
        names += [n for n in piece if n not in names]
    out = {}
    for name in names:
        parts = [piece[name] for piece in pieces if name in piece]
        if len(parts) != len(pieces):
            raise ValueError(f"modality {name!r} is missing from {len(pieces) - len(parts)} of {len(pieces)} pieces")
        out[name] = torch.cat(parts, dim=0)
    return out


def slice_output_targets(
    targets: dict[str, torch.Tensor], input_ids_BS: torch.Tensor, outputs: dict[str, Any], start: int, stop: int
) -> dict[str, torch.Tensor]:
    """The output-decoder targets of samples ``start:stop`` (one target row per sample holding an output's K
    generation tokens, batch-major).

    Args:
        targets: ``{output name: [N, ...]}`` of the whole batch.
        input_ids_BS: ``[B, S]`` ids of the whole batch.
        outputs: ``cfg.model.outputs.active()``.
        start: first sample.
        stop: one past the last sample.

    Returns:
        ``{output name: [N_slice, ...]}`` views.

    Raises:
        ValueError: an output is not enabled, or target rows and samples holding generation tokens disagree.
    """
    out = {}
    for name, rows in targets.items():
        if name not in outputs:
            raise ValueError(f"the batch has {name!r} targets but model.outputs.{name} is not enabled")
        spec = outputs[name]
        owners = [1 if c else 0 for c in rows_per_sample(input_ids_BS, spec.token_id)]
        if sum(owners) != rows.shape[0]:
            raise ValueError(
                f"output {name!r}: {sum(owners)} samples hold generation tokens but {rows.shape[0]} targets given"
            )
        offsets = row_offsets(owners)
        out[name] = rows[offsets[start] : offsets[stop]]
    return out


def concat_targets(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor] | None:
    """Join per-piece output targets in sample order (``None`` when no piece carries any)."""
    names = sorted({n for piece in pieces for n in piece})
    if not names:
        return None
    return {n: torch.cat([piece[n] for piece in pieces if n in piece], dim=0) for n in names}


def concat_tokens(pieces: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Join per-piece token tensors (``TOKEN_KEYS``, each ``[B_i, S]``) along the batch into ``[sum B_i, S]``."""
    return {key: torch.cat([piece[key] for piece in pieces], dim=0) for key in TOKEN_KEYS}


def loss_stats(
    loss_sum: torch.Tensor, num_tokens: torch.Tensor, num_samples: int, parts: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """What a micro-batch reports: ``sum(loss * loss_mask)`` (decoder losses included), ``sum(loss_mask)``, its
    sample count, and ``<output>_loss_sum`` per output decoder (its weighted share of ``loss_sum``).
    """
    stats = {
        "loss_sum": float(loss_sum.detach()),
        "num_tokens": float(num_tokens.detach()),
        "num_samples": int(num_samples),
    }
    for name, value in (parts or {}).items():
        stats[f"{name}_loss_sum"] = float(value.detach())
    return stats
