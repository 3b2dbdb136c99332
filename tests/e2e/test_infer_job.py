"""The inference job end to end: one row per input id (bad inputs listed with their error), disaggregated == fused,
--resume skips written ids; every job has --help."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import infer as infer_job  # noqa: E402
from jobs import train as train_job  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ray_local, synthetic_module):
    root = tmp_path_factory.mktemp("infer")
    synthetic_module.make_synthetic(root / "data", 30, seconds=2.0, fps=8, size=(32, 32), seed=3, val_fraction=0.4)
    val = root / "data" / "val.jsonl"
    rows = [json.loads(line) for line in val.read_text().splitlines()]
    bad = dict(rows[0], id="bad-missing", video="clips/does-not-exist.mp4")
    bad.pop("audio", None)
    val.write_text("".join(json.dumps(r) + "\n" for r in [*rows, bad]))
    run = root / "run"
    train_job.main(["--preset", "tiny", "--runtime", "fused", "--max-steps", "2", "--output-dir", str(run)])
    return root, [r["id"] for r in rows], run


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_one_row_per_id_and_runtimes_agree(trained):
    root, good_ids, run = trained
    val = root / "data" / "val.jsonl"
    out_d, out_f = root / "preds_d.jsonl", root / "preds_f.jsonl"
    common = ["--checkpoint", str(run), "--data-path", str(val), "--infer.batch_size=4", "--infer.max_new_tokens=6"]
    summary = infer_job.main([*common, "--output", str(out_d), "--train.output_dir", str(root / "d")])
    infer_job.main([*common, "--output", str(out_f), "--runtime", "fused", "--train.output_dir", str(root / "f")])
    rows_d, rows_f = _rows(out_d), _rows(out_f)
    ids = [r["id"] for r in rows_d]
    assert sorted(ids) == sorted([*good_ids, "bad-missing"]) and len(ids) == len(set(ids))
    bad = next(r for r in rows_d if r["id"] == "bad-missing")
    assert bad["prediction"] is None and bad["stage"] == "open" and "does-not-exist.mp4" in bad["error"]
    assert summary["written"] == len(good_ids) and summary["quarantined"] == 1
    assert all(0 < r["num_generated_tokens"] <= 6 for r in rows_d if r["prediction"] is not None)
    by_id = {r["id"]: r["prediction"] for r in rows_f}
    assert {r["id"]: r["prediction"] for r in rows_d} == by_id


def test_resume_skips_written_ids(trained):
    root, good_ids, run = trained
    val = root / "data" / "val.jsonl"
    out = root / "preds_resume.jsonl"
    args = ["--checkpoint", str(run), "--data-path", str(val), "--output", str(out), "--runtime", "fused",
            "--infer.max_new_tokens=4", "--train.output_dir", str(root / "r")]
    infer_job.main(args)
    full = _rows(out)
    kept = full[:3]
    out.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "torn')
    summary = infer_job.main([*args, "--resume"])
    assert summary["skipped"] == 3
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in full)
    assert rows[:3] == kept
    assert {r["id"]: r["prediction"] for r in rows} == {r["id"]: r["prediction"] for r in full}


def test_missing_checkpoint_and_data_are_named(tmp_path):
    with pytest.raises(SystemExit, match=r"--checkpoint: no complete checkpoint at '.*nope'"):
        infer_job.main(["--checkpoint", str(tmp_path / "nope"), "--data-path", __file__])
    with pytest.raises(SystemExit, match=r"--data-path '.*absent.jsonl' does not exist"):
        infer_job.main(["--checkpoint", str(tmp_path), "--data-path", str(tmp_path / "absent.jsonl")])


@pytest.mark.parametrize("job", ["train", "infer", "validate", "demo", "bench"])
def test_every_job_has_help(job):
    path = ROOT / "jobs" / f"{job}.py"
    if not path.exists():
        pytest.fail(f"jobs/{job}.py is missing")
    res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "usage:" in res.stdout
