import json

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver.schedule import lr_at
from mimo_ray.observability import MetricsWriter, plot_metrics, read_metrics


def test_warmup_then_cosine():
    train = load_config("tiny", ["train.lr=1.0", "train.min_lr=0.1", "train.warmup_steps=4", "--max-steps", "14"]).train
    lrs = [lr_at(train, s) for s in range(15)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[9] == pytest.approx(0.55)  # half-way through the cosine
    assert lrs[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def _write(root, step, payload):
    tmp = ckpt.begin(root, step)
    torch.save({"w": torch.full((2,), float(payload))}, tmp / "part.pt")
    ckpt.write_driver_state(tmp, {"step": step})
    return tmp


def test_atomic_commit_latest_and_crash_mid_write(tmp_path):
    root = tmp_path / "checkpoints"
    ckpt.commit(root, _write(root, 1, 1), 1)
    ckpt.commit(root, _write(root, 2, 2), 2)
    assert ckpt.latest(root).name == "step_0000002"
    # A crash while writing step 3: the temporary dir exists but was never committed.
    _write(root, 3, 3)
    found = ckpt.latest(root)
    assert found.name == "step_0000002"
    assert torch.load(found / "part.pt", weights_only=True)["w"].tolist() == [2.0, 2.0]
    assert ckpt.driver_state(found)["step"] == 2
    # A torn pointer (points at a dir without COMPLETE) falls back to the newest complete checkpoint.
    (root / "latest").write_text("step_0000009\n")
    assert ckpt.latest(root).name == "step_0000002"
    assert ckpt.resolve(tmp_path).name == "step_0000002"


def test_keep_newest_and_resolve_errors(tmp_path):
    root = tmp_path / "c"
    for step in range(1, 6):
        ckpt.commit(root, _write(root, step, step), step, keep=2)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_0000004", "step_0000005"]
    with pytest.raises(ValueError, match="no complete checkpoint at '.*nowhere'"):
        ckpt.resolve(tmp_path / "nowhere")


def test_driver_rng_round_trip(tmp_path):
    torch.manual_seed(5)
    tmp = ckpt.begin(tmp_path, 1)
    ckpt.write_driver_state(tmp, {"step": 1})
    expected = torch.rand(3)
    ckpt.commit(tmp_path, tmp, 1)
    torch.manual_seed(99)
    ckpt.restore_driver_rng(ckpt.latest(tmp_path))
    assert torch.equal(torch.rand(3), expected)


def test_metrics_jsonl_truncate_and_plot(tmp_path):
    writer = MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write({"step": step, "split": "train", "loss": 1.0 / step, "tokens_per_s": 100.0 * step})
    writer.write({"step": 5, "split": "val", "loss": 0.3}, prefix="val")
    writer.truncate_after(3)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    png = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "m.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    writer.close()
    assert any((tmp_path / "tb").iterdir())
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 1.0
