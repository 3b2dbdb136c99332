"""The Ray Data pipeline on real files: order/determinism, resume, quarantine, per-rank streams, prompt batches,
jobs/validate.py, and the isolated decoder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.data.isolation import FAULTS_ENV, DecodeProcess, decode_isolated
from mimo_ray.data.quarantine import read_quarantine
from mimo_ray.data.sample_media import MediaSpec, decode_media, from_transport
from mimo_ray.data.tokenizer import SPECIAL_TOKENS

QUESTION = "<video>\n<audio>\nWhat colour is the ball and which note is playing?"
STEPS = 6  # 24 samples = 3 epochs of the 8 good training rows
pytestmark = pytest.mark.timeout(240)  # a stalled pipeline fails its test instead of the suite's 600 s
GET_TIMEOUT_S = 180


# ---------------------------------------------------------------- data


def _write_jsonl(path: Path, rows: list) -> str:
    with path.open("w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def _row(rid: str, video: str, audio: str | None = None, question: str = QUESTION, answer: str = "red, A") -> dict:
    row = {"id": rid, "video": video, "conversations": [{"from": "human", "value": question},
                                                        {"from": "gpt", "value": answer}]}  # fmt: skip
    if audio:
        row["audio"] = audio
    return row


@pytest.fixture(scope="module")
def data(tmp_path_factory, synthetic_module, media):
    """12 synthetic samples (1 s, 8 fps, 32x32) and manifests built from them."""
    root = tmp_path_factory.mktemp("pipe")
    info = synthetic_module.make_synthetic(root, 12, seconds=1.0, fps=8, size=(32, 32), seed=3, val_fraction=0.0)
    rows = [json.loads(line) for line in Path(info["train_manifest"]).read_text().splitlines()]
    good = rows[:8]
    (root / "clips" / "empty.mp4").write_bytes(b"")
    train = _write_jsonl(root / "train_mixed.jsonl", good[:4] + [
        _row("bad-missing", "clips/missing.mp4"), *good[4:6], _row("bad-empty", "clips/empty.mp4"), *good[6:]])

    clip = (root / good[0]["video"]).read_bytes()
    (root / "clips" / "truncated.mp4").write_bytes(clip[: len(clip) // 2])
    (root / "clips" / "text.mp4").write_text("this is not a video\n")
    media.write_mp4(root / "clips" / "two_frames.mp4", media.palette_frames(2))
    silent = next(r for r in rows if "audio" in r)  # its mp4 has no audio stream
    # A WAV cut short: its header declares 1 s, the file holds a third (a WAV shorter than its video is valid).
    soundfile.write(root / "audio" / "short.wav", media.tone(440.0, 22050, 1.0), 22050, subtype="PCM_16")
    wav = (root / "audio" / "short.wav").read_bytes()
    (root / "audio" / "short.wav").write_bytes(wav[: len(wav) // 3])
    muxed = next(r for r in rows if "audio" not in r)
    bad = [
        _row("bad-missing", "clips/missing.mp4"),
        _row("bad-empty", "clips/empty.mp4"),
        _row("bad-truncated", "clips/truncated.mp4"),
        _row("bad-notvideo", "clips/text.mp4"),
        _row("bad-frames", "clips/two_frames.mp4", audio=silent["audio"]),
        _row("bad-noaudio", silent["video"]),
        _row("bad-shortaudio", muxed["video"], audio="audio/short.wav"),
        _row("bad-longtext", muxed["video"], question=QUESTION + " " + "x" * 300),
        # Tags must equal media items: two <video> tags for one video file (a sample may now carry any subset of
        # the modalities, so a missing <audio> tag alone is no longer bad: that sample is video-only).
        _row("bad-tags", muxed["video"], question="<video><video><audio>\nWhat colour is the ball?"),
        _row("bad-hang", muxed["video"]),
        _row("bad-abort", muxed["video"]),
        "{this is not json",
        {**good[0], "conversations": good[1]["conversations"]},  # duplicate id
    ]
    expected = {"bad-missing": "open", "bad-empty": "open", "bad-truncated": "decode", "bad-notvideo": "decode",
                "bad-frames": "frames", "bad-noaudio": "audio", "bad-shortaudio": "truncated", "bad-longtext": "text",
                "bad-tags": "tags", "bad-hang": "timeout", "bad-abort": "crash"}  # fmt: skip
    mixed = [*good[:2], *bad[:6], good[2], *bad[6:], good[3]]
    quarantine = _write_jsonl(root / "quarantine.jsonl", mixed)
    infer = _write_jsonl(root / "infer.jsonl", [*good[:3], _row("bad-missing", "clips/missing.mp4"), *good[3:5]])
    return {"root": root, "good": good, "train": train, "quarantine": quarantine, "expected": expected,
            "infer": infer, "valid": _write_jsonl(root / "valid.jsonl", good[:3])}  # fmt: skip


def make_cfg(data_path: str, out: Path, *extra: str):
    return load_config("tiny", [
        f"data.data_path={data_path}", f"train.output_dir={out}", "data.micro_batch_size=2",
        "data.global_batch_size=4", "parallel.encoder_dp=2", "data.num_decode_workers=2",
        f"train.max_steps={STEPS}", "data.max_bad_fraction=0.5", "data.decode_timeout_s=20", *extra,
    ])  # fmt: skip


def run_steps(src, steps: int) -> list[list[dict]]:
    return [src.next_step() for _ in range(steps)]


def flat(steps: list[list[dict]]) -> list[dict]:
    return [mb for step in steps for mb in step]


def same_batch(a: dict, b: dict) -> bool:
    keys = ("input_ids", "position_ids", "labels", "loss_mask")
    if a["ids"] != b["ids"] or not all(torch.equal(a[k], b[k]) for k in keys):
        return False
    return all(
        torch.equal(a["modality_inputs"][m][e][k], b["modality_inputs"][m][e][k])
        for m in a["modality_inputs"] for e in a["modality_inputs"][m] for k in a["modality_inputs"][m][e]
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(data, ray_local, tmp_path_factory):
    """An uninterrupted run over 3 epochs of the mixed training manifest (fused-style pulls)."""
    from mimo_ray.data.pipeline import ManifestDataSource

    out = tmp_path_factory.mktemp("run_ref")
    cfg = make_cfg(data["train"], out)
    src = ManifestDataSource(cfg, "train")
    try:
        steps = run_steps(src, STEPS)
        extras = src.checkpoint_extras()
        quarantined = src.quarantined
    finally:
        src.close()
    return {"cfg": cfg, "out": out, "steps": steps, "extras": extras, "quarantined": quarantined}


# ---------------------------------------------------------------- tests


def test_batches_are_c1_with_exact_placeholders_and_epochs_cover_good_rows(reference, data):
    cfg = reference["cfg"]
    batches = flat(reference["steps"])
    assert len(batches) == 2 * STEPS
    b = batches[0]
    assert b["input_ids"].shape == (2, cfg.model.lm.seq_length) and b["input_ids"].dtype == torch.long
    # Frames stay decoded uint8 RGB all the way to the encoder, which normalises them on its device.
    pixels = b["modality_inputs"]["video"]["clip"]["pixel_values"]
    assert pixels.shape == (2, 4, 32, 32, 3) and pixels.dtype == torch.uint8
    assert b["modality_inputs"]["audio"]["whisper"]["input_features"].shape == (2, 80, 200)
    for batch in batches:
        assert (batch["input_ids"] == 261).sum(1).tolist() == [16, 16]
        assert (batch["input_ids"] == 262).sum(1).tolist() == [8, 8]
        assert ((batch["labels"] != -100) == (batch["loss_mask"] == 1)).all()
    ids = [i for mb in batches for i in mb["ids"]]
    good = sorted(r["id"] for r in data["good"])
    for epoch in range(3):
        assert sorted(ids[8 * epoch : 8 * epoch + 8]) == good  # each epoch: every good row once
    assert ids[:8] != ids[8:16]  # reshuffled per epoch
    bad = {r["id"] for r in read_quarantine(reference["out"] / "quarantine.jsonl")}
    assert bad == {"bad-missing", "bad-empty"} and reference["quarantined"] == 2
    json.dumps(reference["extras"])
    assert reference["extras"]["data_position"]["samples"] == 4 * STEPS
    assert reference["extras"]["tokenizer"]["special_tokens"]["<video>"] == 261


def test_two_runs_with_one_seed_give_identical_batches(reference, data, tmp_path):
    from mimo_ray.data.pipeline import ManifestDataSource

    src = ManifestDataSource(make_cfg(data["train"], tmp_path), "train")
    try:
        again = flat(run_steps(src, 3))
    finally:
        src.close()
    assert all(same_batch(a, b) for a, b in zip(again, flat(reference["steps"])[:6], strict=True))


@pytest.mark.parametrize("start_step", [2, 3])  # 2: exactly at an epoch boundary; 3: mid-epoch, crossing one
def test_resume_yields_the_uninterrupted_sample_ids(reference, data, start_step):
    from mimo_ray.data.pipeline import ManifestDataSource

    cfg = reference["cfg"]
    src = ManifestDataSource(cfg, "train", start_sample=start_step * cfg.data.global_batch_size)
    try:
        pos = src.position()
        resumed = flat(run_steps(src, STEPS - start_step))
    finally:
        src.close()
    expected = flat(reference["steps"][start_step:])
    assert [mb["ids"] for mb in resumed] == [mb["ids"] for mb in expected]
    assert all(same_batch(a, b) for a, b in zip(resumed, expected, strict=True))
    if start_step == 2:
        assert (pos.epoch, pos.rows_consumed) == (1, 0)


def test_rank_streams_reproduce_next_step(reference, ray_local):
    import ray

    from mimo_ray.data.pipeline import ManifestDataSource

    @ray.remote(num_cpus=0)
    class Rank:
        def __init__(self, stream):
            self.stream = iter(stream)

        def pull(self, k):
            return [next(self.stream) for _ in range(k)]

    src = ManifestDataSource(reference["cfg"], "train")
    try:
        actors = [Rank.remote(s) for s in src.rank_streams(2)]
        got = ray.get([a.pull.remote(STEPS) for a in actors], timeout=GET_TIMEOUT_S)
        src.advance(STEPS)
        assert src.samples_consumed == 4 * STEPS
    finally:
        src.close()
        for a in actors:
            ray.kill(a)
    ref = flat(reference["steps"])
    for rank in range(2):
        assert [mb["ids"] for mb in got[rank]] == [mb["ids"] for mb in ref[rank::2]]
        assert all(same_batch(a, b) for a, b in zip(got[rank], ref[rank::2], strict=True))


def test_every_bad_input_is_quarantined_with_its_stage(data, ray_local, tmp_path, monkeypatch):
    from mimo_ray.data.pipeline import ManifestDataSource

    monkeypatch.setenv(FAULTS_ENV, json.dumps({"bad-hang": "hang", "bad-abort": "abort"}))
    cfg = make_cfg(data["train"], tmp_path, f"data.val_path={data['quarantine']}", "data.max_bad_fraction=1.0",
                   "data.decode_timeout_s=8", "data.decode_retries=0")  # fmt: skip  (retries: see the last test)
    src = ManifestDataSource(cfg, "val")
    out_ids = []
    try:
        while step := src.next_step():
            out_ids += [i for mb in step for i in mb["ids"]]
    finally:
        src.close()
    records = read_quarantine(tmp_path / "quarantine.jsonl")
    stages = {r["id"]: r["stage"] for r in records}
    for rid, stage in data["expected"].items():
        assert stages.get(rid) == stage, (rid, records)
    manifest_rows = [r for r in records if r["stage"] == "manifest"]
    assert len(manifest_rows) == 2  # the unparsable line and the duplicate id
    assert all({"id", "path", "stage", "error"} <= set(r) and r["error"] for r in records)
    assert "data.decode_timeout_s" in next(r["error"] for r in records if r["id"] == "bad-hang")
    num_rows = len(Path(data["quarantine"]).read_text().splitlines())
    assert sorted(out_ids) == sorted(r["id"] for r in data["good"][:4])  # the hang and abort cost one sample each
    assert num_rows == len(out_ids) + len(records) == len(out_ids) + src.quarantined


def test_max_bad_fraction_stops_with_a_clear_message(data, ray_local, tmp_path):
    from mimo_ray.data.pipeline import ManifestDataSource
    from mimo_ray.data.quarantine import DataQualityError

    cfg = make_cfg(data["train"], tmp_path, "data.max_bad_fraction=0.1")
    src = ManifestDataSource(cfg, "train")
    try:
        with pytest.raises(DataQualityError, match="data.max_bad_fraction=0.1"):
            run_steps(src, 3)
    finally:
        src.close()


def test_prompt_batches_list_every_id_once(data, ray_local, tmp_path):
    from mimo_ray.data.infer_batches import iter_prompt_batches, prompt_streams

    cfg = make_cfg(data["train"], tmp_path)
    batches = list(iter_prompt_batches(cfg, data["infer"], batch_size=2))
    ids = [i for b in batches for i in b["ids"]]
    bad = [q for b in batches for q in b["quarantined"]]
    manifest_ids = [json.loads(line)["id"] for line in Path(data["infer"]).read_text().splitlines()]
    assert sorted(ids + [q["id"] for q in bad]) == sorted(manifest_ids)
    assert [(q["id"], q["stage"]) for q in bad] == [("bad-missing", "open")]
    for b in batches:
        for i, n in enumerate(b["prompt_lengths"].tolist()):
            row = b["input_ids"][i]
            assert row[n - 1] == SPECIAL_TOKENS["<|assistant|>"] and (row[n:] == SPECIAL_TOKENS["<pad>"]).all()
            assert (row == 261).sum() == 16
        assert b["modality_inputs"]["video"]["clip"]["pixel_values"].shape[0] == len(b["ids"])
        by_id = {r["id"]: r for r in data["good"]}
        for rid, answer, meta in zip(b["ids"], b["answers"], b["meta"], strict=True):
            assert answer == by_id[rid]["conversations"][1]["value"] and meta["colour"] == by_id[rid]["colour"]
    streams, quarantined = prompt_streams(cfg, data["infer"], 1, skip_ids={manifest_ids[0]})
    streamed = [i for b in streams[0] for i in b["ids"]]
    assert sorted(streamed) == sorted(i for i in ids if i != manifest_ids[0])
    assert [q["id"] for q in quarantined] == ["bad-missing"]


def test_validate_job_reports_and_sets_exit_code(data, ray_local, tmp_path, capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from jobs.validate import main

    report = tmp_path / "report.json"
    assert main(["--data-path", data["valid"], "--report", str(report)]) == 0
    assert json.loads(report.read_text())["ok"] == 3
    assert main(["--data-path", data["infer"]]) == 1
    out = capsys.readouterr().out
    assert "bad-missing  [open]" in out and "FAILED" in out


def test_isolated_decoder_survives_hangs_and_aborts(data):
    cfg = load_config("tiny")
    spec = MediaSpec.from_config(cfg)
    good = data["good"][0]
    request = {"video": str(data["root"] / good["video"]), "train": False, "seed": [0, 0, 0],
               "audio": str(data["root"] / good["audio"]) if "audio" in good else None}  # fmt: skip
    proc = DecodeProcess(spec)
    try:
        first = decode_isolated(proc, request, timeout_s=20, retries=0)
        assert first.arrays is not None and first.arrays["video"].shape == (4, 32, 32, 3)
        hang = decode_isolated(proc, {**request, "fault": "hang"}, timeout_s=1, retries=1)
        assert (hang.stage, hang.attempts, hang.arrays) == ("timeout", 2, None)
        abort = decode_isolated(proc, {**request, "fault": "abort"}, timeout_s=20, retries=1)
        assert abort.stage == "crash" and "SIGABRT" in abort.error
        again = decode_isolated(proc, request, timeout_s=20, retries=0)
        assert np.array_equal(again.arrays["video"], first.arrays["video"])
        assert np.array_equal(again.arrays["audio"], first.arrays["audio"])
    finally:
        proc.kill()
    # Frames travel as uint8 and are normalised by the consumer: bit-identical to decoding in-process.
    direct = decode_media(request, spec)
    assert first.arrays["video"].dtype == np.uint8
    assert np.array_equal(from_transport("video", first.arrays["video"][None])[0], direct["video"])
    np.testing.assert_allclose(first.arrays["audio"], direct["audio"], atol=1e-4)  # BLAS threads differ
