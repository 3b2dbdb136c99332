"""The quarantine is remembered: known-bad rows are not decoded again (later epochs, resumed runs), transient failures
are retried a bounded number of times, and a resumed run consumes exactly the uninterrupted run's sample ids."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mimo_ray.data.bad_memory import BadMemory
from mimo_ray.data.epoch_plan import EpochPlan
from mimo_ray.data.isolation import FAULTS_ENV, TRACE_ENV
from mimo_ray.data.quarantine import BadRow, QuarantineLog, read_quarantine

# ---------------------------------------------------------------- the memory itself (no Ray)


def test_verdicts_skip_deterministic_rows_and_bound_transient_retries() -> None:
    memory = BadMemory(retry_epochs=1)
    assert memory.record("a", 2, "open") and not memory.record("a", 3, "open")
    assert [memory.verdict("a", e) for e in range(5)] == [None, None, "open", "open", "open"]
    assert memory.record("t", 0, "timeout")
    # Honoured in the epoch it happened in, tried again in the next, and after a second failure given up for good.
    assert [memory.verdict("t", e) for e in range(3)] == ["timeout", None, None]
    memory.record("t", 2, "crash")
    assert [memory.verdict("t", e) for e in range(2, 6)] == ["crash", "crash", "crash", "crash"]
    assert memory.verdict("unknown", 7) is None
    none_again = BadMemory(retry_epochs=0)
    none_again.record("t", 1, "timeout")
    assert [none_again.verdict("t", e) for e in range(4)] == [None, "timeout", "timeout", "timeout"]
    state = json.loads(json.dumps(memory.to_state()))
    back = BadMemory.from_state(state)
    assert back.to_state() == memory.to_state()
    assert all(back.verdict(i, e) == memory.verdict(i, e) for i in ("a", "t") for e in range(6))
    assert memory.horizon() == 3
    with pytest.raises(ValueError, match="version 9"):
        BadMemory.from_state({"version": 9})


def test_quarantine_log_keeps_one_record_per_transient_epoch(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    log = QuarantineLog(path, "/m.jsonl")
    assert log.add(BadRow("t", "t.mp4", "timeout", "hung", epoch=0))
    assert not log.add(BadRow("t", "t.mp4", "timeout", "hung", epoch=0))
    assert log.add(BadRow("t", "t.mp4", "crash", "died", epoch=1))
    assert log.add(BadRow("d", "d.mp4", "open", "missing", epoch=0))
    assert not log.add(BadRow("d", "d.mp4", "open", "missing", epoch=1))
    records = read_quarantine(path)
    assert [(r["id"], r["epoch"], r["kind"]) for r in records] == [
        ("t", 0, "transient"), ("t", 1, "transient"), ("d", 0, "deterministic")]  # fmt: skip
    again = QuarantineLog(path, "/m.jsonl")  # read back: nothing is written twice
    assert again.count == 2 and not again.add(BadRow("t", "t.mp4", "crash", "died", epoch=1))
    # Old records (no epoch) are known from before the run; a transient record of another split is not this one's.
    old = BadMemory.from_records([{"id": "x", "stage": "frames"}, {"id": "y", "stage": "timeout", "split": "val"}],
                                 retry_epochs=1, split="train")  # fmt: skip
    assert old.verdict("x", 0) == "frames" and old.verdict("y", 0) is None


@pytest.mark.parametrize("shuffle", [True, False])
def test_locate_replays_epoch_dependent_bad_rows(shuffle: bool) -> None:
    plan = EpochPlan(9, seed=5, shuffle=shuffle)
    bad_in = {0: {1, 4}, 1: {4}, 2: {4, 7}, 3: {4, 7, 8}}  # a retried row passes in epoch 1; new failures later

    def bad_of(epoch: int) -> set[int]:
        return bad_in[min(epoch, 3)]

    walk = []  # (epoch, offset just past each good row, bad rows before it in its epoch)
    for epoch in range(5):
        for offset, row in enumerate(plan.order(epoch)):
            if row not in bad_of(epoch):
                before = np.isin(plan.order(epoch)[: offset + 1], list(bad_of(epoch)))
                walk.append((epoch, offset + 1, int(before.sum())))
    ends = np.cumsum([9 - len(bad_of(e)) for e in range(5)])
    for samples in range(1, len(walk)):
        want = (int(np.searchsorted(ends, samples, side="right")), 0, 0) if samples in ends else walk[samples - 1]
        assert plan.locate(samples, bad_of, horizon=4) == want, samples
    assert plan.locate(0, bad_of) == (0, 0, 0)
    with pytest.raises(RuntimeError, match="every row of the manifest is quarantined"):
        plan.locate(5, lambda _e: set(range(9)), horizon=1)


def test_registry_holds_a_later_epoch_while_the_earlier_one_is_being_decoded() -> None:
    from mimo_ray.data.bad_memory import WAIT, BadRowRegistry

    # The plan starts mid-epoch 3 with rows a and b; every later epoch is whole (a, b, c).
    reg = BadRowRegistry({}, 1, first_epoch=3, first_ids=["a", "b"])
    assert reg.ask([("a", 3), ("b", 3)]) == [None, None]  # a task started on a and b of epoch 3
    assert reg.ask([("c", 4), ("a", 4), ("b", 5)]) == [None, WAIT, None]  # b's epoch 4: no task started it
    assert reg.done([("a", 3)], [("a", 3, "open")]) == 1  # a's decode in epoch 3 failed for good
    assert reg.ask([("a", 4), ("a", 9)]) == ["open", "open"]
    assert reg.done([("b", 3), ("c", 4)], [("b", 3, "timeout")]) == 1
    assert reg.ask([("b", 4), ("b", 5), ("c", 5)]) == [None, WAIT, None]  # b: retried in epoch 4
    reg.done([("b", 4)], [])
    assert reg.ask([("b", 5)]) == [None] and reg.verdicts([("b", 3), ("a", 2)]) == ["timeout", None]
    assert reg.in_flight == {("a", 4), ("b", 5), ("c", 5)}  # asked, never done here


def test_a_later_block_that_starts_first_does_not_wait_for_one_that_cannot_start() -> None:
    """Ray Data may start the block holding a row's epoch 1 before the block holding its epoch 0; with room for one
    decode task (a one-node decode pool), waiting for epoch 0 would stall until the wait's deadline."""
    from mimo_ray.data.bad_memory import BadRowRegistry

    reg = BadRowRegistry({}, 1, first_epoch=0, first_ids=["a", "b"])
    assert reg.ask([("a", 1), ("b", 1)]) == [None, None]  # epoch 0's block has not started: decode now
    assert reg.done([("a", 1), ("b", 1)], [("b", 1, "open")]) == 1
    assert reg.ask([("a", 0), ("b", 0)]) == [None, None]  # the earlier block then decodes its own epoch
    reg.done([("a", 0), ("b", 0)], [])
    assert reg.ask([("a", 2), ("b", 2)]) == [None, "open"] and reg.in_flight == {("a", 2)}


# ---------------------------------------------------------------- the pipeline (real media, local Ray)

STEPS = 6  # 24 samples: epoch 0 has 8 good rows, epochs 1 and 2 have 9 (the flaky row passes on its retry)
TIMEOUT_S = 10  # the flaky row's one hang costs this; good rows must decode within it on a loaded machine
pytestmark = pytest.mark.timeout(300)


def _row(rid: str, video: str) -> dict:
    return {"id": rid, "video": video, "conversations": [
        {"from": "human", "value": "<video>\n<audio>\nWhat colour is the ball and which note is playing?"},
        {"from": "gpt", "value": "red, A"}]}  # fmt: skip


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, synthetic_module):
    """8 good rows; two files that fail deterministically (missing, empty); one whose decoder always crashes; one
    whose decoder hangs on its first try only (transient failures)."""
    root = tmp_path_factory.mktemp("memory")
    info = synthetic_module.make_synthetic(root, 8, seconds=1.0, fps=8, size=(32, 32), seed=3, val_fraction=0.0)
    good = [json.loads(line) for line in Path(info["train_manifest"]).read_text().splitlines()]
    (root / "clips" / "empty.mp4").write_bytes(b"")
    muxed = next(r for r in good if "audio" not in r)["video"]
    rows = [*good[:3], _row("bad-missing", "clips/missing.mp4"), *good[3:5], _row("bad-crash", muxed), good[5],
            _row("bad-empty", "clips/empty.mp4"), _row("flaky", muxed), *good[6:]]  # fmt: skip
    manifest = root / "train.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    trace = root / "trace"
    trace.mkdir()
    return {"manifest": str(manifest), "good": [r["id"] for r in good], "trace": trace}


def _cfg(manifest: str, out: Path):
    from mimo_ray.config_cli import load_config

    return load_config("tiny", [
        f"data.data_path={manifest}", f"train.output_dir={out}", "data.micro_batch_size=2",
        "data.global_batch_size=4", "parallel.encoder_dp=2", "data.num_decode_workers=2", f"train.max_steps={STEPS}",
        "data.max_bad_fraction=0.5", f"data.decode_timeout_s={TIMEOUT_S}", "data.decode_retries=0",
        "data.decode_retry_epochs=1",
    ])  # fmt: skip


def _decoded(trace: Path) -> list[tuple[int, str]]:
    path = trace / "decoded.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return [(int(e), rid) for e, rid in (line.split(" ", 1) for line in lines)]


@pytest.fixture(scope="module")
def faults(bad_data):
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULTS_ENV, json.dumps({"bad-crash": "abort", "flaky": "hang-once"}))
    mp.setenv(TRACE_ENV, str(bad_data["trace"]))
    yield
    mp.undo()


@pytest.fixture(scope="module")
def uninterrupted(bad_data, faults, ray_local, tmp_path_factory):
    """An uninterrupted run of 3 epochs (driver-pulled), with the data state a checkpoint would hold after each step."""
    from mimo_ray.data.pipeline import ManifestDataSource

    out = tmp_path_factory.mktemp("run")
    cfg = _cfg(bad_data["manifest"], out)
    src = ManifestDataSource(cfg, "train")
    states, ids = [src.checkpoint_extras()["data_state"]], []
    try:
        for _ in range(STEPS):
            ids.append([mb["ids"] for mb in src.next_step()])
            states.append(json.loads(json.dumps(src.checkpoint_extras()["data_state"])))
    finally:
        src.close()
    return {"cfg": cfg, "out": out, "ids": ids, "states": states, "decoded": _decoded(bad_data["trace"])}


def _flat(steps: list[list[list[str]]]) -> list[str]:
    return [i for step in steps for mb in step for i in mb]


def test_known_bad_rows_are_decoded_once_and_transient_ones_retried(uninterrupted, bad_data):
    ids = _flat(uninterrupted["ids"])
    good = sorted(bad_data["good"])
    assert sorted(ids[:8]) == good  # epoch 0: the flaky row hung on its only try
    assert sorted(ids[8:17]) == sorted([*good, "flaky"])  # epoch 1: retried, and it passes
    assert len(ids) == 4 * STEPS and set(ids[17:]) <= {*good, "flaky"}
    decoded = Counter(rid for _, rid in uninterrupted["decoded"])
    # Deterministic failures: one decode in three epochs. The crashing row: its try and one retry epoch, then given up.
    assert (decoded["bad-missing"], decoded["bad-empty"], decoded["bad-crash"]) == (1, 1, 2)
    assert {e for e, rid in uninterrupted["decoded"] if rid == "bad-crash"} == {0, 1}
    records = read_quarantine(uninterrupted["out"] / "quarantine.jsonl")
    assert sorted((r["id"], r["stage"], r["kind"], r["epoch"]) for r in records) == [
        ("bad-crash", "crash", "transient", 0), ("bad-crash", "crash", "transient", 1),
        ("bad-empty", "open", "deterministic", 0), ("bad-missing", "open", "deterministic", 0),
        ("flaky", "timeout", "transient", 0)]  # fmt: skip
    state = uninterrupted["states"][STEPS]
    assert state["position"]["samples"] == 4 * STEPS and state["position"]["epoch"] == 2
    assert state["memory"]["deterministic"]["bad-missing"] == {"epoch": 0, "stage": "open"}
    assert state["memory"]["transient"]["flaky"] == {"0": "timeout"}


def _consumed_since(trace: Path, before: int) -> list[tuple[int, str]]:
    return _decoded(trace)[before:]


def test_resume_mid_epoch_0_honours_recorded_outcomes_without_decoding_bad_rows(uninterrupted, bad_data):
    """Resumed (from a checkpoint's data_state) before the flaky row's timeout: the recorded outcome is honoured, so
    the flaky row is skipped in epoch 0 exactly as in the run that met it, and no known-bad row is decoded again.
    """
    from mimo_ray.driver.data_sources import build_data_source

    start, cfg = 1, uninterrupted["cfg"]
    before = len(_decoded(bad_data["trace"]))
    # What the train loop calls with the data_state of the checkpoint's driver.json.
    src = build_data_source(cfg, "train", start_sample=start * 4, data_state=uninterrupted["states"][start])
    try:
        resumed = [[mb["ids"] for mb in src.next_step()] for _ in range(STEPS - start)]
        assert src.checkpoint_extras()["data_state"]["position"] == uninterrupted["states"][STEPS]["position"]
    finally:
        src.close()
    assert resumed == uninterrupted["ids"][start:]
    again = _consumed_since(bad_data["trace"], before)
    assert not [d for d in again if d[1] in ("bad-missing", "bad-empty", "bad-crash") or d == (0, "flaky")], again


def test_resumed_rank_streams_consume_the_uninterrupted_ids(uninterrupted, bad_data, ray_local):
    """Resumed in epoch 2, after the flaky row passed its retry in epoch 1, from the quarantine file alone (no
    data_state): the per-rank streams continue with exactly the uninterrupted ids, and no bad row is decoded again.
    """
    import ray

    from mimo_ray.data.pipeline import ManifestDataSource

    start, cfg = 5, uninterrupted["cfg"]
    assert "flaky" in _flat(uninterrupted["ids"])[8 : 4 * start]  # timed out in epoch 0, consumed before the resume

    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self, stream):
            self.stream = iter(stream)

        def pull(self, k):
            return [next(self.stream)["ids"] for _ in range(k)]

    before = len(_decoded(bad_data["trace"]))
    src = ManifestDataSource(cfg, "train", start_sample=start * 4)
    actors = []
    try:
        assert src.position().to_dict() == uninterrupted["states"][start]["position"]
        actors = [Rank.remote(s) for s in src.rank_streams(2)]
        got = ray.get([a.pull.remote(STEPS - start) for a in actors], timeout=180)
    finally:
        src.close()
        for a in actors:
            ray.kill(a)
    want = [mb for step in uninterrupted["ids"][start:] for mb in step]
    assert got[0] == want[0::2] and got[1] == want[1::2]
    again = _consumed_since(bad_data["trace"], before)
    assert not [d for d in again if d[1] in ("bad-missing", "bad-empty", "bad-crash")], again


def test_decode_tasks_ask_and_tell_the_shared_registry(bad_data, faults, ray_local, tmp_path):
    """A decode task skips rows the registry knows bad (no decode) and tells it the failures it meets, before its
    block is handed on: how a row found bad in one epoch of a long per-rank plan is skipped in the next."""
    import dataclasses

    import pyarrow as pa
    import ray

    from mimo_ray.data import prepare
    from mimo_ray.data.bad_memory import BadRowRegistry
    from mimo_ray.data.epoch_plan import PLAN_SCHEMA
    from mimo_ray.data.manifest import read_manifest
    from mimo_ray.data.tokenizer import ChatTokenizer

    cfg = _cfg(bad_data["manifest"], tmp_path)
    manifest = read_manifest(bad_data["manifest"])
    registry = ray.remote(num_cpus=0)(BadRowRegistry).remote({}, 1, 1, manifest.ids)  # a plan from epoch 1
    try:
        # Known from before the plan (e.g. the quarantine file of the run being resumed).
        assert ray.get(registry.done.remote([("bad-empty", 0)], [("bad-empty", 0, "open")]), timeout=120) == 1
        opts = prepare.DecodeOptions.from_config(cfg, "train", ChatTokenizer.from_config(cfg), ray.put(manifest.table))
        opts = dataclasses.replace(opts, registry=[registry])
        rows = [manifest.ids.index(i) for i in ("bad-missing", "bad-empty", "syn-000000")]
        plan = pa.table({"pos": [12 + r for r in rows], "epoch": [1, 1, 1], "row": rows, "known": [None] * 3},
                        schema=PLAN_SCHEMA)  # fmt: skip
        before = len(_decoded(bad_data["trace"]))
        out = prepare.decode_batch(plan, opts).to_pylist()
        assert [(o["id"], o["ok"], o["stage"]) for o in out] == [
            ("bad-missing", False, "open"), ("bad-empty", False, "open"), ("syn-000000", True, "")]  # fmt: skip
        assert "not decoded again" in out[1]["error"]
        assert _decoded(bad_data["trace"])[before:] == [(1, "bad-missing"), (1, "syn-000000")]
        verdicts = ray.get(registry.verdicts.remote([("bad-missing", 0), ("bad-missing", 2), ("syn-000000", 2)]),
                           timeout=120)  # fmt: skip
        assert verdicts == [None, "open", None]
        # The block is done: epoch 2 of its rows need not wait for it.
        assert ray.get(registry.ask.remote([("syn-000000", 2), ("bad-missing", 2)]), timeout=120) == [None, "open"]
    finally:
        ray.kill(registry)
        for proc in prepare._PROCESSES.values():
            proc.kill()
