"""The README's main job, small: jobs/demo.py end to end (synthetic clips, disaggregated training on the session
Ray, KV-cache inference, accuracy table); two runs with the same seed on one machine give the same predictions."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import demo  # noqa: E402


def _predictions(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    return {r["id"]: r["prediction"] for r in rows}


def test_small_demo_is_deterministic_and_scores_every_val_clip(ray_local, tmp_path):
    args = ["--num-samples", "20", "--steps", "12", "--seed", "3"]
    first = demo.main(["--out", str(tmp_path / "a"), *args])
    second = demo.main(["--out", str(tmp_path / "b"), *args])
    assert first["n"] == second["n"] == 4  # 20 % of 20 clips, every one answered
    for key in ("exact", "colour", "note"):
        assert 0.0 <= first[key] <= 1.0 and first[key] == second[key]
    assert first["chance_exact"] == 1 / 16
    preds = _predictions(tmp_path / "a")
    assert len(preds) == 4 and all(isinstance(p, str) for p in preds.values())
    assert preds == _predictions(tmp_path / "b")  # same seed, same machine: the same answers
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and not summary["failures"]
