"""Manifest reading (JSONL = Parquet, broken rows kept as error rows) and the epoch plan's resume arithmetic."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mimo_ray.data.epoch_plan import EpochPlan
from mimo_ray.data.manifest import read_manifest
from mimo_ray.data.ray_dataset import clips_per_task

CONV = [{"from": "human", "value": "<video>\n<audio>\nQ?"}, {"from": "gpt", "value": "red, A"}]


def test_jsonl_and_parquet_read_the_same(tmp_path):
    rows = [
        {"id": "a", "video": "clips/a.mp4", "audio": "audio/a.wav", "conversations": CONV, "colour": "red"},
        {"id": "b", "video": "/abs/b.mp4", "conversations": CONV, "colour": "blue"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    a, b = read_manifest(tmp_path / "m.jsonl"), read_manifest(tmp_path / "m.parquet")
    cols = ["id", "video", "audio", "error"]
    assert a.table.select(cols).to_pylist() == b.table.select(cols).to_pylist()
    first = a.table.to_pylist()[0]
    assert first["video"] == str(tmp_path / "clips" / "a.mp4") and first["error"] is None
    assert json.loads(first["meta"]) == {"colour": "red"} and json.loads(first["conversations"]) == CONV
    assert a.table.to_pylist()[1]["video"] == "/abs/b.mp4"
    assert [json.loads(r["conversations"]) for r in b.table.to_pylist()] == [CONV, CONV]


def test_broken_rows_become_error_rows_with_unique_ids(tmp_path):
    lines = [
        json.dumps({"id": "a", "video": "a.mp4", "conversations": CONV}),
        "{not json",
        json.dumps({"video": "x.mp4", "conversations": CONV}),
        json.dumps({"id": "a", "video": "b.mp4", "conversations": CONV}),
        json.dumps({"id": "c", "video": "c.mp4"}),
        "",
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    m = read_manifest(tmp_path / "m.jsonl")
    rows = m.table.to_pylist()
    assert len(rows) == 5 and len(set(m.ids)) == 5
    assert [r["error"] is None for r in rows] == [True, False, False, False, False]
    assert "not valid JSON" in rows[1]["error"] and "no 'id'" in rows[2]["error"]
    assert "duplicate id" in rows[3]["error"] and "conversations" in rows[4]["error"]
    with pytest.raises(ValueError, match="does not exist"):
        read_manifest(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("shuffle", [True, False])
def test_locate_matches_a_walk_over_the_plan(shuffle):
    plan = EpochPlan(11, seed=7, shuffle=shuffle)
    bad = {2, 5, 9}
    walk = []  # (epoch, offset just past each good row)
    for epoch in range(4):
        for offset, row in enumerate(plan.order(epoch)):
            if row not in bad:
                walk.append((epoch, offset + 1))
    good = plan.num_rows - len(bad)
    for samples in range(1, len(walk)):
        epoch, offset, bad_before = plan.locate(samples, bad)
        # Just past the last consumed good row; a finished epoch continues at the start of the next one.
        want = (samples // good, 0) if samples % good == 0 else walk[samples - 1]
        assert (epoch, offset) == want, samples
        assert bad_before == int(np.isin(plan.order(epoch)[:offset], list(bad)).sum())
    assert plan.locate(0, bad) == (0, 0, 0)
    assert not np.array_equal(plan.order(0), plan.order(1)) or not shuffle


def test_clips_per_task_keeps_every_worker_busy():
    assert clips_per_task(10_000, 4) == 15
    assert clips_per_task(12, 2) == 2
    assert clips_per_task(1, 8) == 1


def test_timed_iterator_passes_items_errors_and_stalls():
    import time

    from mimo_ray.data.pipeline import TimedIterator

    def stalls():
        yield 1
        time.sleep(1.5)
        yield 2

    it = TimedIterator(stalls(), 0.3, "test")
    assert next(it) == 1
    with pytest.raises(TimeoutError, match="produced nothing for 0.3 s"):
        next(it)
    it.close()

    def fails():
        yield 1
        raise ValueError("boom")

    it = TimedIterator(fails(), 5, "test")
    assert next(it) == 1
    with pytest.raises(ValueError, match="boom"):
        next(it)
    assert list(TimedIterator(iter_gen(3), 5, "test")) == [0, 1, 2]


def iter_gen(n):
    yield from range(n)
