"""The decode op of the pipeline: plan rows ``(pos, epoch, row)`` → decoded, tokenised samples (or bad rows).

Runs as a Ray Data ``map_batches`` task. Per sample, cheapest checks first: the manifest row itself, tags against
media fields and the model's modalities, the tokenised length, then media decoding in the isolated child process
(:mod:`mimo_ray.data.isolation`) with ``data.decode_timeout_s`` and ``data.decode_retries``. Nothing raises for a bad
sample: it becomes a row with ``ok=False`` and its stage, so rows in = rows out + rows quarantined. A plan row already
known bad (``known``, or by the shared :class:`~mimo_ray.data.bad_memory.BadRowRegistry`) is not decoded again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mimo_ray.data.bad_memory import WAIT
from mimo_ray.data.collate import DECODED_SCHEMA, MODALITY_COLUMNS
from mimo_ray.data.decode_hooks import pack_user_media, registered, resolve_decoders, run_decoder
from mimo_ray.data.isolation import FAULTS_ENV, TRACE_ENV, DecodeProcess, decode_isolated
from mimo_ray.data.manifest import MODALITY_FIELDS, first_media_path, media_items
from mimo_ray.data.quarantine import kind_of
from mimo_ray.data.sample_media import MediaSpec, request_paths
from mimo_ray.data.tokenizer import MODALITY_TAGS, ChatTokenizer, TokenizeError, count_tags

MODES = ("train", "eval", "infer")
_REGISTRY_TIMEOUT_S = 60.0


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
        faults: ``{file name or id: "hang"|"abort"|"exit"}``, or ``"hang-once"`` etc. for the first try of that
            row in the whole test only (tests; from ``MIMO_RAY_DECODE_FAULTS``).
        trace: a folder where every row decoded is appended to ``decoded.txt`` as ``<epoch> <id>`` and "-once"
            faults leave their marks (tests; from ``MIMO_RAY_DECODE_TRACE``); ``""``: none.
        registry: ``[BadRowRegistry actor]`` to ask before decoding and to tell of failures, or ``[]``.
        decoders: ``{user modality: row -> {encoder: {kwarg: array [k, ...]}}}`` (:mod:`~mimo_ray.data.decode_hooks`).
        user_tags: ``{user modality: tag}``.
    """

    mode: str
    seed: int
    tokenizer: dict[str, Any]
    media: MediaSpec
    timeout_s: float
    retries: int
    manifest_ref: list = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)
    trace: str = ""
    registry: list = field(default_factory=list)
    decoders: dict[str, Any] = field(default_factory=dict)
    user_tags: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Any, mode: str, tokenizer: ChatTokenizer, manifest_ref: Any) -> DecodeOptions:
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}; known: {', '.join(MODES)}")
        faults = json.loads(os.environ.get(FAULTS_ENV) or "{}")
        trace = os.environ.get(TRACE_ENV, "")
        if any(f.endswith("-once") for f in faults.values()) and not trace:
            raise ValueError(f"{FAULTS_ENV} has a '-once' fault; it needs the folder {TRACE_ENV} to mark it done")
        return cls(
            mode=mode,
            seed=cfg.data.seed,
            tokenizer=tokenizer.to_dict(),
            media=MediaSpec.from_config(cfg),
            timeout_s=cfg.data.decode_timeout_s,
            retries=cfg.data.decode_retries,
            manifest_ref=[manifest_ref],
            faults=faults,
            trace=trace,
            decoders=resolve_decoders(cfg.data.decoders, registered()),
            user_tags=dict(tokenizer.user_tags),
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


def media_request(row: dict[str, Any], counts: dict[str, int], modalities: tuple[str, ...]) -> dict[str, Any]:
    """The media items a row asks the decoder for: every path of its ``video``/``audio``/``image`` fields; audio
    from the videos' own streams when the row has ``<audio>`` tags and no ``audio`` field.
    """
    request: dict[str, Any] = {"items": True}
    for fld in MODALITY_FIELDS.values():
        request[fld] = media_items(row.get(fld))
    if "audio" in modalities and counts.get("audio") and not request["audio"] and request["video"]:
        request["audio_from"] = "video"
    return request


def check_tags(
    conversations: Any, row: dict[str, Any], modalities: tuple[str, ...], user_tags: dict[str, str] | None = None
) -> str | None:
    """Why the row's tags do not match its media items or the model's modalities (``None`` when they do).

    The rule is "tags equal media items", per modality: a sample carries any subset of the model's modalities —
    none (text-only), one, or several items of one (multi-image: one ``<image>`` tag per ``image`` list entry, in
    order). Media fields of modalities the model lacks are ignored when no tag refers to them.
    """
    if not isinstance(conversations, list):
        return None  # reported by the tokenizer with stage "manifest"
    counts = count_tags(conversations, user_tags)
    request = media_request(row, counts, modalities)
    for mod, tag in MODALITY_TAGS.items():
        n, fld = counts[mod], MODALITY_FIELDS[mod]
        if mod not in modalities:
            if n:
                return f"{n} {tag} tag(s) but model.modalities={list(modalities)}"
            continue
        items = len(request["video"]) if mod == "audio" and request.get("audio_from") else len(request[fld])
        if n != items:
            source = "'audio' item(s) (or videos with an audio track)" if mod == "audio" else f"'{fld}' item(s)"
            return f"modality {mod!r}: {n} {tag} tag(s) but {items} {source}; each tag stands for one item, in order"
    for mod, tag in (user_tags or {}).items():
        if counts.get(mod) and mod not in modalities:
            return f"{counts[mod]} {tag} tag(s) but model.modalities={list(modalities)}"
    return None


def user_row(row: dict[str, Any], conversations: Any) -> dict[str, Any]:
    """The manifest row as the user wrote it (their own fields, ``id``, ``conversations``, media paths) for a user
    decode function.
    """
    out = dict(json.loads(row.get("meta") or "{}"))
    out.update({"id": row["id"], "conversations": conversations})
    for fld in ("video", "audio", "image"):
        items = media_items(row.get(fld))
        if items:
            out[fld] = items if len(items) > 1 else items[0]
    return out


def _fault(row: dict[str, Any], request: dict[str, Any], opts: DecodeOptions) -> str | None:
    faults = opts.faults
    if not faults:
        return None
    fault = faults.get(row["id"])
    for path in request_paths(request):
        fault = fault or faults.get(os.path.basename(path))
    if fault and fault.endswith("-once"):
        try:  # the first try of this row anywhere creates the mark; later tries find it and decode normally
            os.close(os.open(os.path.join(opts.trace, f"fault-done-{row['id']}"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return None
        return fault.removesuffix("-once")
    return fault


def _trace(opts: DecodeOptions, plan: dict[str, Any], row: dict[str, Any]) -> None:
    if opts.trace:
        with open(os.path.join(opts.trace, "decoded.txt"), "a", encoding="utf-8") as f:
            f.write(f"{plan['epoch']} {row['id']}\n")


def prepare_row(plan: dict[str, Any], row: dict[str, Any], opts: DecodeOptions) -> dict[str, Any]:
    """One plan row + its manifest row → one :data:`DECODED_SCHEMA` row."""
    out = {
        "pos": plan["pos"], "epoch": plan["epoch"], "row": plan["row"], "id": row["id"], "ok": False,
        "stage": "", "error": "", "path": first_media_path(row), "tokens": b"", "labels": b"", "loss_mask": b"",
        "answer": "", "meta": row.get("meta") or "{}", "m_video": b"", "m_audio": b"", "m_images": b"",
        "m_user": b"",
    }  # fmt: skip

    def bad(stage: str, error: str) -> dict[str, Any]:
        out.update(stage=stage, error=error)
        return out

    _trace(opts, plan, row)
    if row.get("error"):
        return bad("manifest", row["error"])
    conversations = json.loads(row["conversations"])
    all_modalities = (*opts.media.modalities, *opts.user_tags)
    problem = check_tags(conversations, row, all_modalities, opts.user_tags)
    if problem:
        return bad("tags", problem)
    tok = _tokenizer(opts.tokenizer)
    try:
        enc = tok.encode_prompt(conversations) if opts.mode == "infer" else tok.encode(conversations)
    except TokenizeError as err:
        return bad(err.stage, err.message)
    counts = count_tags(conversations, opts.user_tags)
    user: dict[str, Any] = {}
    for mod in opts.user_tags:
        if not counts.get(mod):
            continue
        if mod not in opts.decoders:
            return bad("tags", f"{counts[mod]} {opts.user_tags[mod]} tag(s) but modality {mod!r} has no decode "
                               "function (data.decoders, or Trainer(decoders=...))")
        try:
            user[mod] = run_decoder(mod, opts.decoders[mod], user_row(row, conversations), counts[mod])
        except ValueError as err:
            return bad("decode", str(err))
    request = {
        **media_request(row, counts, opts.media.modalities),
        "train": opts.mode == "train",
        "seed": [opts.seed, plan["epoch"], plan["row"]],
    }
    request["fault"] = _fault(row, request, opts)
    outcome = decode_isolated(_process(opts.media), request, opts.timeout_s, opts.retries)
    if outcome.arrays is None:
        return bad(outcome.stage, outcome.error)
    out["m_user"] = pack_user_media(user)
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


def _registry_call(opts: DecodeOptions, method: str, *args: Any) -> Any:
    """Call the shared bad-row registry; ``None`` when there is none or it does not answer (an optimisation only)."""
    if not opts.registry:
        return None
    import ray

    try:
        return ray.get(getattr(opts.registry[0], method).remote(*args), timeout=_REGISTRY_TIMEOUT_S)
    except Exception:  # a dead or slow registry costs decode work, never correctness
        return None


def _await_verdict(opts: DecodeOptions, key: tuple[str, int], deadline: float) -> str | None:
    """Wait until the row's previous appearance is decoded (by an earlier task); then its verdict, or ``None`` to
    decode it. Gives up at ``deadline`` (the task that held it may have died) and decodes the row.
    """
    while time.monotonic() < deadline:
        answer = _registry_call(opts, "ask", [key])
        if answer is None or answer[0] != WAIT:
            return answer[0] if answer else None
        time.sleep(0.1)
    return None


def known_row(plan: dict[str, Any], row: dict[str, Any], stage: str) -> dict[str, Any]:
    """The :data:`DECODED_SCHEMA` row of a plan row known bad with ``stage`` (not decoded)."""
    out = {**dict.fromkeys(DECODED_SCHEMA.names), "pos": plan["pos"], "epoch": plan["epoch"], "row": plan["row"]}
    out.update(id=row["id"], ok=False, stage=stage, path=first_media_path(row),
               error=f"known bad ({stage}) from an earlier epoch or run; not decoded again")  # fmt: skip
    return out


def decode_batch(plan: pa.Table, opts: DecodeOptions) -> pa.Table:
    """The ``map_batches`` UDF: a block of plan rows → decoded rows, same order. Rows known bad (the plan's
    ``known`` column, or the shared registry) are not decoded; failures met are told to the registry.
    """
    manifest = _manifest(opts.manifest_ref[0])
    plans = plan.to_pylist()
    rows = manifest.take(pa.array([p["row"] for p in plans], type=pa.int64())).to_pylist()
    known = [p.get("known") for p in plans]
    keys = [(r["id"], int(p["epoch"])) for p, r in zip(plans, rows, strict=True)]
    asked = _registry_call(opts, "ask", keys) or [None] * len(keys)
    # Waiting for an earlier task is bounded by its longest decode of one row plus a margin.
    deadline = time.monotonic() + opts.timeout_s * (1 + opts.retries) + _REGISTRY_TIMEOUT_S
    out, failed_here = [], {}  # failed_here: deterministic failures of this block (an epoch boundary inside it)
    try:
        for i, (p, r) in enumerate(zip(plans, rows, strict=True)):
            known[i] = known[i] or failed_here.get(r["id"]) or (asked[i] if asked[i] != WAIT else None)
            earlier_here = any(rid == r["id"] for rid, _ in keys[:i])  # its previous appearance is in this block
            if not known[i] and asked[i] == WAIT and not earlier_here:
                known[i] = _await_verdict(opts, keys[i], deadline)
            if known[i]:
                out.append(known_row(p, r, known[i]))
                continue
            try:
                out.append(prepare_row(p, r, opts))
            except Exception as err:  # a bug or an unexpected library error costs this sample, with a record
                fallback = {"pos": p["pos"], "epoch": p["epoch"], "row": p["row"], "id": r["id"], "ok": False,
                            "stage": "error", "error": f"{type(err).__name__}: {err}", "path": first_media_path(r)}
                out.append({**dict.fromkeys(DECODED_SCHEMA.names), **fallback})  # fmt: skip
            if not out[-1]["ok"] and kind_of(out[-1]["stage"]) == "deterministic":
                failed_here[r["id"]] = out[-1]["stage"]
    finally:
        # Told before the block is handed on, so a decode task planned after this one already knows.
        failures = [(o["id"], int(o["epoch"]), o["stage"]) for o, k in zip(out, known, strict=False)
                    if not o["ok"] and not k]  # fmt: skip
        _registry_call(opts, "done", keys[: len(out)], failures)
    return pa.Table.from_pylist(out, schema=DECODED_SCHEMA)
