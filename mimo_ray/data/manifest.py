"""LLaVA-style manifests (JSONL or Parquet) → one typed Arrow table; media paths resolved against the manifest.

A row: ``{"id", "video"?, "audio"?, "image"?, "conversations": [{"from": "human", "value": "<video> …"},
{"from": "gpt", "value": "…"}], ...metadata}``. When ``audio`` is omitted and the model needs audio, the video's own
audio stream is used. A malformed row does not stop the read: it becomes a row with ``error`` set (quarantined later
at stage ``manifest``), so rows in = rows out + rows quarantined holds from the manifest on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

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


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read a ``.jsonl``/``.json`` (one object per line) or ``.parquet`` manifest.

    Raises:
        ValueError: the file does not exist, has an unknown extension, or holds no rows (naming the path).
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise ValueError(f"data manifest {str(path)!r} does not exist")
    base = path.parent
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        raw: list[tuple[int, Any, str | None]] = [(i, r, None) for i, r in enumerate(pq.read_table(path).to_pylist())]
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        raw = _read_jsonl(path)
    else:
        raise ValueError(f"data manifest {str(path)!r}: unknown format; use .jsonl or .parquet")
    if not raw:
        raise ValueError(f"data manifest {str(path)!r} holds no rows")
    rows = []
    first_line: dict[str, int] = {}
    for line, rec, error in raw:
        row = _normalise(rec, line, base, path.name, error)
        if row["error"] is None:
            if row["id"] in first_line:
                row["error"] = f"duplicate id {row['id']!r} (first at row {first_line[row['id']]})"
            else:
                first_line[row["id"]] = line
        row["row"] = len(rows)
        rows.append(row)
    # Ids must be unique even for broken rows, so every row gets exactly one output or quarantine record.
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            row["id"] = f"{row['id']}#row{row['row']}"
        seen.add(row["id"])
    return Manifest(str(path), pa.Table.from_pylist(rows, schema=SCHEMA))


def _read_jsonl(path: Path) -> list[tuple[int, Any, str | None]]:
    out: list[tuple[int, Any, str | None]] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                out.append((lineno, json.loads(line), None))
            except json.JSONDecodeError as err:
                out.append((lineno, None, f"line {lineno} is not valid JSON: {err}"))
    return out


def _normalise(rec: Any, line: int, base: Path, name: str, error: str | None) -> dict[str, Any]:
    """A raw record → a :data:`SCHEMA` row (``error`` set when the record is unusable)."""
    fallback_id = f"{name}:{line}"
    if error is not None or not isinstance(rec, dict):
        return _row(fallback_id, error=error or f"line {line} is not a JSON object")
    rid = rec.get("id")
    if rid is None or (isinstance(rid, str) and not rid.strip()):
        return _row(fallback_id, error=f"line {line} has no 'id'")
    row = _row(str(rid))
    for field in MEDIA_FIELDS:
        value = rec.get(field)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(v, str) and v for v in items):
            row["error"] = f"'{field}' must be a path string or a list of them, got {value!r:.60}"
            return row
        paths = [str(base / v) if not os.path.isabs(v) else v for v in items]
        row[field] = paths[0] if isinstance(value, str) else json.dumps(paths)
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        row["error"] = "'conversations' must be a non-empty list"
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
