"""LLaVA-style manifests (JSONL, JSON array or Parquet) → one typed Arrow table; media paths resolved.

Relative media paths resolve against ``data.<field>_folder`` when set (LLaVA's ``image`` paths are relative to an
image root, e.g. ``coco/train2017/….jpg``), else against the manifest's folder; absolute paths are kept.

A row: ``{"id", "video"?, "audio"?, "image"?, "conversations": [{"from": "human", "value": "<video> …"},
{"from": "gpt", "value": "…"}], ...metadata}``. When ``audio`` is omitted and the model needs audio, the video's own
audio stream is used. A malformed row does not stop the read: it becomes a row with ``error`` set (quarantined later
at stage ``manifest``), so rows in = rows out + rows quarantined holds from the manifest on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

log = logging.getLogger("mimo_ray")

MEDIA_FIELDS = ("video", "audio", "image")
#: The media field that carries each modality.
MODALITY_FIELDS = {"video": "video", "audio": "audio", "images": "image"}
_KNOWN = {"id", "conversations", *MEDIA_FIELDS}

SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("id", pa.string()),
        ("video", pa.string()),
        ("audio", pa.string()),
        ("image", pa.string()),
        ("conversations", pa.string()),  # JSON
        ("meta", pa.string()),  # JSON of the other fields (e.g. colour, note)
        ("error", pa.string()),  # why the row itself is unusable, or null
    ]
)


@dataclass
class Manifest:
    """A read manifest.

    Attributes:
        path: absolute path of the manifest file.
        table: one row per manifest row (:data:`SCHEMA`), in file order.
    """

    path: str
    table: pa.Table

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()


#: Rows converted to Arrow at a time while reading.
_BATCH_ROWS = 8192
#: How many bytes of the file :func:`manifest_format` looks at.
_SNIFF_BYTES = 4096


def manifest_format(path: str | os.PathLike) -> str:
    """The manifest's format from its content (not its name): ``"parquet"``, ``"json_array"`` or ``"jsonl"``.

    Parquet files start with the magic ``PAR1``; after an optional UTF-8 BOM and whitespace, a JSON array starts
    with ``[`` and JSONL with ``{`` (one object per line).

    Raises:
        ValueError: the content is none of these (naming the path and what it starts with).
    """
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip()
    if text.startswith(b"["):
        return "json_array"
    if text.startswith(b"{") or not text:
        return "jsonl"
    raise ValueError(
        f"data manifest {os.fspath(path)!r}: unknown format (starts with {text[:20]!r}); "
        "use JSONL (one object per line), a JSON array of objects, or Parquet"
    )


def media_folders(cfg: Any) -> dict[str, str | None]:
    """``{media field: root folder or None}`` from ``data.video_folder`` / ``audio_folder`` / ``image_folder``."""
    return {field: getattr(cfg.data, f"{field}_folder", None) for field in MEDIA_FIELDS}


def read_manifest(path: str | os.PathLike, folders: dict[str, str | None] | None = None) -> Manifest:
    """Read a JSONL, JSON-array or Parquet manifest (detected by content; see :func:`manifest_format`).

    JSON arrays and Parquet files are streamed (ijson items, Parquet record batches): the raw file is never held
    whole in memory, only the compact :data:`SCHEMA` table.

    Args:
        path: the manifest file.
        folders: per media field (``video``, ``audio``, ``image``) the folder that relative paths of that field are
            resolved against (``data.<field>_folder``); a field without one resolves against the manifest's folder.
            Absolute paths are used as they are.

    Raises:
        ValueError: the file does not exist, has an unknown format or holds no rows. An array element that is not
            valid JSON becomes an error row (``row N is not valid JSON``), not an error of the file
            (:mod:`mimo_ray.data.json_array`).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"data manifest {str(path)!r} does not exist")
    bases = {field: path.parent for field in MEDIA_FIELDS}
    for field, folder in (folders or {}).items():
        if folder:
            bases[field] = Path(folder).expanduser().resolve()
    fmt = manifest_format(path)
    reader = {"parquet": _read_parquet, "json_array": _read_json_array, "jsonl": _read_jsonl}[fmt]
    batches: list[pa.RecordBatch] = []
    rows: list[dict[str, Any]] = []
    first_line: dict[str, int] = {}
    seen: set[str] = set()
    num_rows = 0
    for line, rec, error in reader(path):
        row = _normalise(rec, line, bases, path.name, error, where="line" if fmt == "jsonl" else "row")
        if row["error"] is None:
            if row["id"] in first_line:
                row["error"] = f"duplicate id {row['id']!r} (first at row {first_line[row['id']]})"
            else:
                first_line[row["id"]] = line
        row["row"] = num_rows
        # Ids must be unique even for broken rows, so every row gets exactly one output or quarantine record.
        if row["id"] in seen:
            row["id"] = f"{row['id']}#row{row['row']}"
        seen.add(row["id"])
        rows.append(row)
        num_rows += 1
        if len(rows) == _BATCH_ROWS:  # keep Python objects bounded: the table is far smaller than the dicts
            batches.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
            rows = []
    if not num_rows:
        raise ValueError(f"data manifest {str(path)!r} holds no rows")
    batches.append(pa.RecordBatch.from_pylist(rows, schema=SCHEMA))
    return Manifest(str(path), pa.Table.from_batches(batches, schema=SCHEMA).combine_chunks())


def _read_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pyarrow.parquet as pq

    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for rec in batch.to_pylist():
            yield index, rec, None
            index += 1


def _read_json_array(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Elements of a top-level JSON array, one at a time (``row`` = 0-based element index)."""
    import ijson

    index = 0
    with path.open("rb") as f:
        try:
            for rec in ijson.items(f, "item", use_float=True):
                yield index, rec, None
                index += 1
            return
        except ijson.JSONError as err:
            offset = f.tell()
            failure = err
    # Invalid JSON inside the array: continue with the bracket scanner from the element that failed, so that one
    # element becomes an error row and the ones after it are still read.
    log.warning("data manifest %s: invalid JSON at element %d (near byte %d: %s); scanning the rest element by "
                "element", path, index, offset, failure)  # fmt: skip
    from mimo_ray.data.json_array import scan_array

    yield from scan_array(path, start=index)


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line), None
            except json.JSONDecodeError as err:
                yield lineno, None, f"line {lineno} is not valid JSON: {err}"


def _normalise(
    rec: Any, line: int, bases: dict[str, Path], name: str, error: str | None, where: str = "line"
) -> dict[str, Any]:
    """A raw record → a :data:`SCHEMA` row (``error`` set when the record is unusable).

    ``where`` names the position in messages: ``line`` (1-based JSONL line) or ``row`` (0-based element/row index).
    """
    at = f"{where} {line}"
    fallback_id = f"{name}:{line}"
    if error is not None or not isinstance(rec, dict):
        return _row(fallback_id, error=error or f"{at} is not a JSON object (got {type(rec).__name__})")
    rid = rec.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return _row(fallback_id, error=f"{at} has no 'id'")
    if not isinstance(rid, str | int):
        return _row(fallback_id, error=f"{at}: 'id' must be a string or integer, got {rid!r:.60}")
    row = _row(str(rid))
    for field in MEDIA_FIELDS:
        value = rec.get(field)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            row["error"] = f"{at}: '{field}' must be a path string or a list of them, got {value!r:.60}"
            return row
        paths = [str(bases[field] / v) if not os.path.isabs(v) else v for v in items]
        row[field] = paths[0] if isinstance(value, str) else json.dumps(paths)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        row["error"] = f"{at}: 'conversations' must be a non-empty list"
        return row
    row["conversations"] = json.dumps(conv, ensure_ascii=False)
    row["meta"] = json.dumps({k: v for k, v in rec.items() if k not in _KNOWN}, ensure_ascii=False, default=str)
    return row


def _row(rid: str, error: str | None = None) -> dict[str, Any]:
    return {"row": -1, "id": rid, "video": None, "audio": None, "image": None, "conversations": "[]",
            "meta": "{}", "error": error}  # fmt: skip


def media_items(value: str | None) -> list[str]:
    """The paths a media column holds: none, one path, or a list of them (multi-image rows: ``"image": [..]``).

    A list is stored as its JSON array; resolved paths are absolute, so a value starting with ``[`` is a list.
    """
    if not value:
        return []
    return list(json.loads(value)) if value.startswith("[") else [value]


def first_media_path(row: dict[str, Any]) -> str:
    """The path to name in a quarantine record (video, else audio, else image, else '')."""
    for field in MEDIA_FIELDS:
        items = media_items(row.get(field))
        if items:
            return items[0]
    return ""
