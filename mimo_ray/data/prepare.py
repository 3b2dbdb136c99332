"""The decode op of the pipeline: plan rows ``(pos, epoch, row)`` → decoded, tokenised samples (or bad rows).

Runs as a Ray Data ``map_batches`` task. Per sample, cheapest checks first: the manifest row itself, tags against
media fields and the model's modalities, the tokenised length, then media decoding in the isolated child process
(:mod:`mimo_ray.data.isolation`) with ``data.decode_timeout_s`` and ``data.decode_retries``. Nothing raises for a bad
sample: it becomes a row with ``ok=False`` and its stage, so rows in = rows out + rows quarantined.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mimo_ray.data.collate import DECODED_SCHEMA, MODALITY_COLUMNS
from mimo_ray.data.isolation import FAULTS_ENV, DecodeProcess, decode_isolated
from mimo_ray.data.manifest import MODALITY_FIELDS, first_media_path
from mimo_ray.data.sample_media import MediaSpec, request_paths
from mimo_ray.data.tokenizer import MODALITY_TAGS, ChatTokenizer, TokenizeError, count_tags

MODES = ("train", "eval", "infer")


@dataclass
class DecodeOptions:
    """Everything a decode task needs; built in the driver, shipped with the task.

    Attributes:
        mode: ``train`` (frame/crop jitter, full encodings), ``eval`` (uniform frames) or ``infer`` (uniform
            frames, prompt-only encodings).
        seed: ``data.seed``; jitter of a sample is seeded by ``(seed, epoch, row)``.
        tokenizer: ``ChatTokenizer.to_dict()``.
        media: shapes and feature settings.
        timeout_s, retries: ``data.decode_timeout_s``, ``data.decode_retries``.
        manifest_ref: ``[ObjectRef]`` of the manifest table (a list, so Ray does not resolve it on the way).
        faults: ``{file name or id: "hang"|"abort"|"exit"}`` (tests; from ``MIMO_RAY_DECODE_FAULTS``).
    """

    mode: str
    seed: int
    tokenizer: dict[str, Any]
    media: MediaSpec
    timeout_s: float
    retries: int
    manifest_ref: list = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any, mode: str, tokenizer: ChatTokenizer, manifest_ref: Any) -> DecodeOptions:
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}; known: {', '.join(MODES)}")
        faults = os.environ.get(FAULTS_ENV)
        return cls(
            mode=mode,
            seed=cfg.data.seed,
            tokenizer=tokenizer.to_dict(),
            media=MediaSpec.from_config(cfg),
            timeout_s=cfg.data.decode_timeout_s,
            retries=cfg.data.decode_retries,
            manifest_ref=[manifest_ref],
            faults=json.loads(faults) if faults else {},
        )


# Per-process caches (a Ray worker runs many decode tasks).
_TOKENIZERS: dict[str, ChatTokenizer] = {}
_PROCESSES: dict[MediaSpec, DecodeProcess] = {}
_MANIFESTS: dict[str, pa.Table] = {}


def _tokenizer(data: dict[str, Any]) -> ChatTokenizer:
    key = json.dumps(data, sort_keys=True)
    if key not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[key] = ChatTokenizer.from_dict(data)
    return _TOKENIZERS[key]


def _process(spec: MediaSpec) -> DecodeProcess:
    if spec not in _PROCESSES:
        for proc in _PROCESSES.values():
            proc.kill()
        _PROCESSES.clear()
        _PROCESSES[spec] = DecodeProcess(spec)
    return _PROCESSES[spec]


def _manifest(ref: Any) -> pa.Table:
    import ray

    key = ref.hex()
    if key not in _MANIFESTS:
        _MANIFESTS.clear()
        _MANIFESTS[key] = ray.get(ref, timeout=300)
    return _MANIFESTS[key]


def check_tags(conversations: Any, row: dict[str, Any], modalities: tuple[str, ...]) -> str | None:
    """Why the row's tags do not match its media fields or the model's modalities (``None`` when they do)."""
    if not isinstance(conversations, list):
        return None  # reported by the tokenizer with stage "manifest"
    counts = count_tags(conversations)
    for mod, tag in MODALITY_TAGS.items():
        n, fld = counts[mod], MODALITY_FIELDS[mod]
        if mod not in modalities:
            if n:
                return f"{n} {tag} tag(s) but model.modalities={list(modalities)}"
            continue
        if n != 1:
            return f"{n} {tag} tags; each sample needs exactly one (model.modalities={list(modalities)})"
        has_media = bool(row.get(fld)) or (mod == "audio" and bool(row.get("video")))
        if not has_media:
            source = "'audio' file or a video" if mod == "audio" else f"'{fld}' file"
            return f"{tag} tag but the row has no {source}"
    return None


def _fault(row: dict[str, Any], request: dict[str, Any], faults: dict[str, str]) -> str | None:
    if not faults:
        return None
    if row["id"] in faults:
        return faults[row["id"]]
    for path in request_paths(request):
        if os.path.basename(path) in faults:
            return faults[os.path.basename(path)]
    return None


def prepare_row(plan: dict[str, Any], row: dict[str, Any], opts: DecodeOptions) -> dict[str, Any]:
    """One plan row + its manifest row → one :data:`DECODED_SCHEMA` row."""
    out = {
        "pos": plan["pos"], "epoch": plan["epoch"], "row": plan["row"], "id": row["id"], "ok": False,
        "stage": "", "error": "", "path": first_media_path(row), "tokens": b"", "labels": b"", "loss_mask": b"",
        "answer": "", "meta": row.get("meta") or "{}", "m_video": b"", "m_audio": b"", "m_images": b"",
    }  # fmt: skip

    def bad(stage: str, error: str) -> dict[str, Any]:
        out.update(stage=stage, error=error)
        return out

    if row.get("error"):
        return bad("manifest", row["error"])
    conversations = json.loads(row["conversations"])
    problem = check_tags(conversations, row, opts.media.modalities)
    if problem:
        return bad("tags", problem)
    tok = _tokenizer(opts.tokenizer)
    try:
        enc = tok.encode_prompt(conversations) if opts.mode == "infer" else tok.encode(conversations)
    except TokenizeError as err:
        return bad(err.stage, err.message)
    request = {
        "video": row.get("video"),
        "audio": row.get("audio"),
        "image": row.get("image"),
        "train": opts.mode == "train",
        "seed": [opts.seed, plan["epoch"], plan["row"]],
    }
    request["fault"] = _fault(row, request, opts.faults)
    outcome = decode_isolated(_process(opts.media), request, opts.timeout_s, opts.retries)
    if outcome.arrays is None:
        return bad(outcome.stage, outcome.error)
    if opts.mode == "infer":
        out["tokens"] = enc.ids[: enc.prompt_len].astype(np.int32).tobytes()
        out["answer"] = enc.answer or ""
    else:
        input_ids, labels, loss_mask = tok.pad(enc)
        out["tokens"] = input_ids.astype(np.int32).tobytes()
        out["labels"] = labels.astype(np.int32).tobytes()
        out["loss_mask"] = loss_mask.astype(np.uint8).tobytes()
    for mod, arr in outcome.arrays.items():
        out[MODALITY_COLUMNS[mod]] = arr.tobytes()
    out["ok"] = True
    return out


def decode_batch(plan: pa.Table, opts: DecodeOptions) -> pa.Table:
    """The ``map_batches`` UDF: a block of plan rows → decoded rows, same order."""
    manifest = _manifest(opts.manifest_ref[0])
    plans = plan.to_pylist()
    rows = manifest.take(pa.array([p["row"] for p in plans], type=pa.int64())).to_pylist()
    out = []
    for p, r in zip(plans, rows, strict=True):
        try:
            out.append(prepare_row(p, r, opts))
        except Exception as err:  # a bug or an unexpected library error costs this sample, with a record
            fallback = {"pos": p["pos"], "epoch": p["epoch"], "row": p["row"], "id": r["id"], "ok": False,
                        "stage": "error", "error": f"{type(err).__name__}: {err}", "path": first_media_path(r)}
            out.append({**dict.fromkeys(DECODED_SCHEMA.names), **fallback})  # fmt: skip
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)
