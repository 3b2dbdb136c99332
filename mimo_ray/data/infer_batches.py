"""Prompt batches for batched inference: prompt-only ids, media, reference answers, and every quarantined id.

    for batch in iter_prompt_batches(cfg, "data/syn/val.jsonl", batch_size=8):
        batch["input_ids"] [B, L] (right-padded), batch["prompt_lengths"] [B], batch["modality_inputs"],
        batch["ids"], batch["answers"], batch["meta"], batch["quarantined"]  # [{id, path, stage, error}, ...]

Every manifest id appears exactly once over the whole iteration: in some batch's ``ids`` or in some batch's
``quarantined``, so the inference job can write one output row per input id. Bad rows are attached to the batch that
follows them (trailing ones to the last batch); a manifest with no usable row yields one batch with ``B = 0``.

Padding: **right** by default. MimoModel ignores attention masks, so with right padding a prompt's tokens never see
pad tokens (causal attention) and position ids are ``0…L-1``; the generator reads the logits at
``prompt_lengths - 1``. ``padding_side="left"`` aligns the prompts' ends instead (position ids then start at 0 on
the first real token, pads get position 0) for generators that handle pads themselves.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mimo_ray.data.collate import MODALITY_COLUMNS, BatchLayout, bad_row_of
from mimo_ray.data.decode_hooks import concat_user_media, unpack_user_media
from mimo_ray.data.manifest import media_folders, read_manifest
from mimo_ray.data.quarantine import BadBudget, QuarantineLog, quarantine_path
from mimo_ray.data.ray_dataset import closing_iter, decode_dataset, ensure_ray, iter_batches_ending_gently
from mimo_ray.data.sample_media import from_transport
from mimo_ray.data.tokenizer import ChatTokenizer

Batch = dict[str, Any]


def collate_prompts(rows: list[dict[str, Any]], layout: BatchLayout, pad_id: int, padding_side: str) -> Batch:
    """Decoded infer rows (``ok``) → one prompt batch (without ``quarantined``)."""
    import torch

    prompts = [np.frombuffer(r["tokens"], dtype=np.int32).astype(np.int64) for r in rows]
    lengths = np.array([p.size for p in prompts], dtype=np.int64)
    width = int(lengths.max()) if len(prompts) else 0
    input_ids = np.full((len(prompts), width), pad_id, dtype=np.int64)
    position_ids = np.zeros((len(prompts), width), dtype=np.int64)
    for i, p in enumerate(prompts):
        start = 0 if padding_side == "right" else width - p.size
        input_ids[i, start : start + p.size] = p
        position_ids[i, start : start + p.size] = np.arange(p.size)
    encoders = dict(layout.encoders)
    modality_inputs = {}
    for mod in layout.modalities:
        data = b"".join(r[MODALITY_COLUMNS[mod]] for r in rows)
        arr = from_transport(mod, layout.media_from_bytes(mod, data))
        if len(arr):  # prompts carry any subset of the modalities
            modality_inputs[mod] = {encoders[mod][0]: {encoders[mod][1]: torch.from_numpy(arr)}}
    user = concat_user_media([unpack_user_media(r.get("m_user") or b"") for r in rows])
    for mod, encoders_in in user.items():
        modality_inputs[mod] = {e: {k: torch.from_numpy(np.array(a)) for k, a in kw.items()}
                                for e, kw in encoders_in.items()}
    return {
        "input_ids": torch.from_numpy(input_ids),
        "position_ids": torch.from_numpy(position_ids),
        "prompt_lengths": torch.from_numpy(lengths),
        "modality_inputs": modality_inputs,
        "ids": [r["id"] for r in rows],
        "answers": [r["answer"] or None for r in rows],
        "meta": [json.loads(r["meta"] or "{}") for r in rows],
        "padding_side": padding_side,
    }


def _infer_dataset(
    cfg: Any,
    manifest_path: str,
    tokenizer: ChatTokenizer | None,
    skip_ids: set[str] | frozenset[str] = frozenset(),
    reserved_cpus: float = 0.0,
) -> tuple[Any, Any, ChatTokenizer]:
    """``(decoded dataset in file order, manifest, tokenizer)`` for inference (rows of ``skip_ids`` left out)."""
    import ray

    from mimo_ray.data.epoch_plan import EpochPlan
    from mimo_ray.data.prepare import DecodeOptions

    ensure_ray(cfg)
    tokenizer = tokenizer or ChatTokenizer.from_config(cfg)
    manifest = read_manifest(manifest_path, media_folders(cfg))
    plan = EpochPlan(len(manifest), cfg.data.seed, shuffle=False).table(0)
    if skip_ids:
        plan = plan.filter(pa.array([rid not in skip_ids for rid in manifest.ids]))
    opts = DecodeOptions.from_config(cfg, "infer", tokenizer, ray.put(manifest.table))
    return decode_dataset([plan], opts, cfg, reserved_cpus=reserved_cpus), manifest, tokenizer


def iter_prompt_batches(
    cfg: Any,
    manifest_path: str | None = None,
    batch_size: int | None = None,
    *,
    padding_side: str = "right",
    quarantine_file: str | Path | None = None,
    max_bad_fraction: float | None = None,
    tokenizer: ChatTokenizer | None = None,
) -> Iterator[Batch]:
    """Prompt batches of a manifest, in file order, decoded in parallel on Ray Data (uniform frames).

    Args:
        cfg: config (shapes, tokenizer, ``data.*``).
        manifest_path: the manifest (default ``data.val_path``).
        batch_size: samples per batch (default ``infer.batch_size``).
        padding_side: ``right`` (default) or ``left``.
        quarantine_file: where bad rows are recorded (default ``<train.output_dir>/quarantine.jsonl``).
        max_bad_fraction: stop when more rows are bad (default ``data.max_bad_fraction``).
        tokenizer: the checkpoint's tokenizer (default: from the config).

    Yields:
        Batches as described in the module docstring.

    Raises:
        DataQualityError: more than ``max_bad_fraction`` of the rows are bad.
    """
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r}; use 'right' or 'left'")
    batch_size = batch_size or cfg.infer.batch_size
    manifest_path = manifest_path or cfg.data.val_path
    if manifest_path is None:
        raise ValueError("iter_prompt_batches needs a manifest_path (or data.val_path)")
    ds, read, tokenizer = _infer_dataset(cfg, manifest_path, tokenizer)
    layout = BatchLayout.from_config(cfg)
    pad_id = tokenizer.pad_id
    manifest = read.path
    qlog = QuarantineLog(quarantine_file or quarantine_path(cfg.train.output_dir), manifest)
    fraction = cfg.data.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    budget = BadBudget(len(read), fraction, manifest)
    good: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    held: Batch | None = None
    batches = iter_batches_ending_gently(ds, batch_size=None, batch_format="pyarrow", prefetch_batches=2)
    with closing_iter(batches) as tables:
        for table in tables:
            for row in table.to_pylist():
                if row["ok"]:
                    good.append(row)
                else:
                    record = bad_row_of(row, manifest, "infer")
                    qlog.add(record)
                    budget.add(0, record)
                    bad.append({"id": record.id, "path": record.path, "stage": record.stage, "error": record.error})
                if len(good) == batch_size:
                    if held is not None:
                        yield held
                    held = {**collate_prompts(good, layout, pad_id, padding_side), "quarantined": bad}
                    good, bad = [], []
    if good:
        if held is not None:
            yield held
        held = {**collate_prompts(good, layout, pad_id, padding_side), "quarantined": bad}
    elif held is not None:
        held["quarantined"] = held["quarantined"] + bad
    else:
        held = {**collate_prompts([], layout, pad_id, padding_side), "quarantined": bad}
    yield held


class PromptStream:
    """Picklable iterable of prompt batches over one ``streaming_split`` shard of decoded infer rows.

    Args:
        shard: the rank's ``DataIterator``.
        batch_size: samples per batch (the last one may be smaller).
        layout, pad_id, padding_side: as for :func:`collate_prompts`.
    """

    def __init__(self, shard: Any, batch_size: int, layout: BatchLayout, pad_id: int, padding_side: str) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.layout = layout
        self.pad_id = pad_id
        self.padding_side = padding_side

    def __iter__(self) -> Iterator[Batch]:
        rows: list[dict[str, Any]] = []
        for row in self.shard.iter_rows():
            if not row["ok"]:
                continue  # listed up front by prompt_streams
            rows.append(row)
            if len(rows) == self.batch_size:
                yield collate_prompts(rows, self.layout, self.pad_id, self.padding_side)
                rows = []
        if rows:
            yield collate_prompts(rows, self.layout, self.pad_id, self.padding_side)


def prompt_streams(
    cfg: Any,
    manifest_path: str,
    num_streams: int,
    *,
    skip_ids: set[str] | frozenset[str] = frozenset(),
    tokenizer: ChatTokenizer | None = None,
    batch_size: int | None = None,
    padding_side: str = "right",
    quarantine_file: str | Path | None = None,
    reserved_cpus: float = 0.0,
) -> tuple[list[PromptStream], list[dict[str, str]]]:
    """Decode a manifest for inference and split its prompt batches over ``num_streams`` encoder ranks.

    Decoding runs in parallel on Ray Data and is materialised in the object store first, so every bad row is known
    before generation starts: the caller writes their rows, then pulls the streams (each row reaches exactly one
    stream; batches never pass through the driver).

    Args:
        cfg: config.
        manifest_path: the manifest.
        num_streams: encoder ranks.
        skip_ids: ids already done (``--resume``); they are neither decoded nor listed.
        tokenizer: the checkpoint's tokenizer (default: from the config).
        batch_size: default ``infer.batch_size``.
        padding_side: ``right`` (default) or ``left``.
        quarantine_file: default ``<train.output_dir>/quarantine.jsonl``.
        reserved_cpus: logical CPUs the stage actors hold, kept out of the decode budget.

    Returns:
        ``(streams, quarantined)`` with ``quarantined = [{"id", "path", "stage", "error"}, ...]`` in file order.

    Raises:
        DataQualityError: more than ``data.max_bad_fraction`` of the rows are bad.
    """
    ds, manifest, tokenizer = _infer_dataset(cfg, manifest_path, tokenizer, skip_ids, reserved_cpus)
    decoded = ds.materialize()
    qlog = QuarantineLog(quarantine_file or quarantine_path(cfg.train.output_dir), manifest.path)
    budget = BadBudget(len(manifest), cfg.data.max_bad_fraction, manifest.path)
    quarantined = []
    columns = ["pos", "epoch", "row", "id", "ok", "stage", "error", "path"]
    for table in decoded.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            if row["ok"]:
                continue
            record = bad_row_of(row, manifest.path, "infer")
            qlog.add(record)
            budget.add(0, record)
            quarantined.append({"id": record.id, "path": record.path, "stage": record.stage, "error": record.error})
    layout = BatchLayout.from_config(cfg)
    shards = decoded.streaming_split(num_streams, equal=False)
    size = batch_size or cfg.infer.batch_size
    return [PromptStream(s, size, layout, tokenizer.pad_id, padding_side) for s in shards], quarantined
