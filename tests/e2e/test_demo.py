"""The README's main job, small: jobs/demo.py end to end (synthetic clips, disaggregated training on the session
Ray, KV-cache inference, accuracy table)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import demo  # noqa: E402


def _predictions(out: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (out / "preds.jsonl").read_text().splitlines()]
    return {r["id"]: r["prediction"] for r in rows}


def test_small_demo_scores_every_val_clip(ray_local, tmp_path):
    """One run (determinism of training is tested by test_train_job.py: resume and the fused runtime give the same
    losses and samples; of the KV-cache answers by test_infer_job.py: both runtimes write the same rows)."""
    first = demo.main(["--out", str(tmp_path / "a"), "--num-samples", "20", "--steps", "12", "--seed", "3"])
    assert first["n"] == 4  # 20 % of 20 clips, every one answered
    for key in ("exact", "colour", "note"):
        assert 0.0 <= first[key] <= 1.0
    assert first["chance_exact"] == 1 / 16
    preds = _predictions(tmp_path / "a")
    assert len(preds) == 4 and all(isinstance(p, str) for p in preds.values())
    summary = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and not summary["failures"]
