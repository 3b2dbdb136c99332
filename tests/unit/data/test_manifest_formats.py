"""Manifest formats detected by content (JSONL, JSON array streamed, Parquet), media folders, malformed rows."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mimo_ray.config import Config
from mimo_ray.config_cli import load_config
from mimo_ray.data.manifest import _read_json_array, manifest_format, media_folders, read_manifest

IMAGE_CONV = [
    {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
    {"from": "gpt", "value": "The bus in the image is white and red."},
]
VIDEO_CONV = [{"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "A ball moves."}]
# LLaVA-1.5 mix665k and LLaVA-Video-178K row shapes, with the extra fields those files carry.
LLAVA_ROWS = [
    {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": IMAGE_CONV},
    {"id": "v_0001", "video": "academic/v_0001.mp4", "conversations": VIDEO_CONV, "data_source": "academic"},
    {"id": "abs", "image": "/data/abs.png", "conversations": IMAGE_CONV, "model": "gpt-4"},
]


def write_array(path: Path, rows: list, indent: int | None = None) -> Path:
    path.write_text(json.dumps(rows, indent=indent))
    return path


def test_format_is_detected_by_content_not_name(tmp_path: Path) -> None:
    write_array(tmp_path / "a.jsonl", LLAVA_ROWS)  # a JSON array behind a .jsonl name
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in LLAVA_ROWS))  # JSONL behind .json
    keys = sorted({k for r in LLAVA_ROWS for k in r})  # Parquet columns are shared: absent fields become nulls
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in LLAVA_ROWS]), tmp_path / "c.data")
    (tmp_path / "d.txt").write_text("id,conversations\n")
    assert [manifest_format(tmp_path / n) for n in ("a.jsonl", "b.json", "c.data")] == [
        "json_array",
        "jsonl",
        "parquet",
    ]
    with pytest.raises(ValueError, match=r"d\.txt'?: unknown format \(starts with b'id,conv"):
        read_manifest(tmp_path / "d.txt")
    cols = ["row", "id", "video", "audio", "image", "conversations", "meta", "error"]
    tables = [read_manifest(tmp_path / n).table.select(cols).to_pylist() for n in ("a.jsonl", "b.json", "c.data")]
    assert tables[0] == tables[1]
    # Parquet: the same rows, except that null columns are carried in meta as nulls.
    meta = [{k: v for k, v in json.loads(r.pop("meta")).items() if v is not None} for r in tables[2]]
    assert meta == [json.loads(r["meta"]) for r in tables[0]]
    assert tables[2] == [{k: v for k, v in r.items() if k != "meta"} for r in tables[0]]
    assert [r["id"] for r in tables[0]] == ["000000033471", "v_0001", "abs"] and all(
        r["error"] is None for r in tables[0]
    )
    assert json.loads(tables[0][1]["meta"]) == {"data_source": "academic"}  # unknown fields carried, not used


def test_media_folders_resolve_relative_paths_per_field(tmp_path: Path) -> None:
    path = write_array(tmp_path / "llava.json", LLAVA_ROWS, indent=2)
    folders = {"image": str(tmp_path / "imgs"), "video": str(tmp_path / "vids"), "audio": None}
    rows = read_manifest(path, folders).table.to_pylist()
    assert rows[0]["image"] == str(tmp_path / "imgs" / "coco" / "train2017" / "000000033471.jpg")
    assert rows[1]["video"] == str(tmp_path / "vids" / "academic" / "v_0001.mp4")
    assert rows[2]["image"] == "/data/abs.png"  # absolute paths untouched
    # Without folders, relative paths resolve against the manifest's folder (as before).
    assert read_manifest(path).table.to_pylist()[0]["image"] == str(
        tmp_path / "coco" / "train2017" / "000000033471.jpg"
    )
    cfg = load_config("tiny", [f"--data.image_folder={tmp_path / 'imgs'}", f"--data.video_folder={tmp_path / 'vids'}"])
    assert media_folders(cfg) == folders
    assert media_folders(Config()) == {"video": None, "audio": None, "image": None}


def test_malformed_rows_are_error_rows_naming_index_and_id(tmp_path: Path) -> None:
    rows = [
        LLAVA_ROWS[0],
        "not an object",
        {"image": "x.jpg", "conversations": IMAGE_CONV},  # no id
        {"id": "bad_image", "image": 7, "conversations": IMAGE_CONV},
        {"id": "bad_conv", "image": "y.jpg", "conversations": "hello"},
        {"id": "000000033471", "image": "z.jpg", "conversations": IMAGE_CONV},  # duplicate
        LLAVA_ROWS[1],
    ]
    for path in (write_array(tmp_path / "m.json", rows),):
        table = read_manifest(path).table.to_pylist()
        assert len(table) == 7  # nothing lost: every element is a row
        errors = {r["row"]: (r["id"], r["error"]) for r in table if r["error"]}
        assert sorted(errors) == [1, 2, 3, 4, 5]
        assert errors[1] == ("m.json:1", "row 1 is not a JSON object (got str)")
        assert errors[2] == ("m.json:2", "row 2 has no 'id'")
        assert errors[3] == ("bad_image", "row 3: 'image' must be a path string or a list of them, got 7")
        assert errors[4] == ("bad_conv", "row 4: 'conversations' must be a non-empty list")
        assert errors[5] == ("000000033471#row5", "duplicate id '000000033471' (first at row 0)")
        assert [r["error"] for r in table if r["row"] in (0, 6)] == [None, None]


def test_an_element_with_a_json_syntax_error_is_one_error_row(tmp_path: Path, monkeypatch) -> None:
    text = json.dumps(LLAVA_ROWS[:2])[:-1] + ', {"id": "c", "conversations": [}], ' + json.dumps(LLAVA_ROWS[2]) + "]"
    (tmp_path / "broken.json").write_text(text)
    rows = read_manifest(tmp_path / "broken.json").table.to_pylist()
    assert [(r["row"], r["id"]) for r in rows] == [(0, "000000033471"), (1, "v_0001"), (2, "broken.json:2"), (3, "abs")]
    assert rows[2]["error"].startswith("row 2 is not valid JSON: Expecting value")
    assert [r["error"] for r in rows if r["row"] != 2] == [None, None, None]
    # A file cut inside an element: the rows before it, and that element as an error row.
    (tmp_path / "cut.json").write_text(text[: text.index('{"id": "c"') + 12])
    cut = read_manifest(tmp_path / "cut.json").table.to_pylist()
    assert [r["error"] for r in cut] == [None, None, "row 2 is not valid JSON: the array ends inside it"]


def test_the_fallback_scanner_is_exact_across_chunk_boundaries(tmp_path: Path, monkeypatch) -> None:
    import mimo_ray.data.json_array as json_array

    tricky = [{"id": f"r{i}", "value": 'a\\"b, ] } [ {' * (i % 3), "n": [1, {"x": [2]}]} for i in range(300)]
    path = write_array(tmp_path / "t.json", tricky)
    for chunk in (5, 7, 64, 4096):  # escapes, quotes and brackets split at every kind of boundary
        monkeypatch.setattr(json_array, "_CHUNK", chunk)
        assert [rec for _, rec, _ in json_array.scan_array(path)] == tricky, chunk
        assert [i for i, _, _ in json_array.scan_array(path, start=297)] == [297, 298, 299]


def test_json_arrays_are_streamed_not_loaded_whole(tmp_path: Path) -> None:
    rows = [{"id": f"{i:08d}", "image": f"coco/{i:08d}.jpg", "conversations": IMAGE_CONV} for i in range(20000)]
    path = write_array(tmp_path / "big.json", rows)  # one line of ~4.6 MB
    size = path.stat().st_size
    assert size > 4_000_000
    next(_read_json_array(write_array(tmp_path / "one.json", rows[:1])))  # import ijson outside the measurement
    tracemalloc.start()
    try:
        count = sum(1 for _ in _read_json_array(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 20000
    # json.load would hold the 4.4 MB text and every parsed row (> 20 MB); ijson keeps its read buffer and one
    # element: measured peak 0.43-0.50 MB whether 2,000 or 20,000 elements are read.
    assert peak < size / 4, (peak, size)
    manifest = read_manifest(path)
    assert len(manifest) == 20000 and manifest.ids[-1] == "00019999"
