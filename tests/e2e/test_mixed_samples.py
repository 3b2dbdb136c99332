"""Per-sample modalities through the Ray Data pipeline (issue 21 item 2, issue 20 items 5-6): one manifest mixing
video+audio rows, single-image, multi-image and text-only rows, and rows of a user modality decoded by a user
function; only the broken rows are quarantined; fused and disaggregated steps agree."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import mimo_ray
from mimo_ray.data.prepare import check_tags
from mimo_ray.media.files import write_png

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
REL = 1e-5


def _conv(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_tags_must_equal_media_items():
    mods = ("video", "audio", "images")
    assert check_tags(_conv("Hi there", "hello"), {}, mods) is None  # text-only
    two = {"image": json.dumps(["/a.png", "/b.png"])}
    assert check_tags(_conv("<image><image> same?", "no"), two, mods) is None  # multi-image
    assert check_tags(_conv("<video> what?", "x"), {"video": "/v.mp4"}, mods) is None  # video only, no audio tag
    assert check_tags(_conv("<video><audio> what?", "x"), {"video": "/v.mp4"}, mods) is None  # audio from the video
    err = check_tags(_conv("<image> same?", "no"), two, mods)
    assert err == ("modality 'images': 1 <image> tag(s) but 2 'image' item(s); each tag stands for one item, "
                   "in order")
    assert "2 <video> tag(s) but 1 'video' item(s)" in check_tags(_conv("<video><video>", "x"), {"video": "/v"}, mods)
    assert check_tags(_conv("<image> hi", "x"), {"image": "/a.png"}, ("video",)) == (
        "1 <image> tag(s) but model.modalities=['video']")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, synthetic_module):
    root = tmp_path_factory.mktemp("mixed")
    synthetic_module.make_synthetic(root / "syn", 8, seconds=2.0, fps=8, size=(32, 32), seed=5, val_fraction=0.0)
    clips = [json.loads(line) for line in (root / "syn" / "train.jsonl").read_text().splitlines()]
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    colours = {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rows = []
    for k, clip in enumerate(clips):  # video rows (audio muxed or a WAV beside), paths relative to syn/
        row = {**clip, "id": f"vid-{k}"}
        for fld in ("video", "audio"):
            if fld in row:
                row[fld] = str(root / "syn" / row[fld])
        rows.append(row)
    for k in range(8):
        name = list(colours)[k % 2]
        img = np.clip(np.array(colours[name]) + rng.normal(0, 8, (24, 40, 3)), 0, 255).astype(np.uint8)
        write_png(root / "img" / f"{k}.png", img)
        rows.append({"id": f"img-{k}", "image": str(root / "img" / f"{k}.png"),
                     "conversations": _conv("<image>\nWhat colour is it?", name)})
    for k in range(4):
        rows.append({"id": f"multi-{k}", "image": [str(root / "img" / f"{k}.png"), str(root / "img" / f"{k + 1}.png")],
                     "conversations": _conv("<image><image>\nSame colour?", "no")})
    for k in range(4):
        rows.append({"id": f"text-{k}", "conversations": _conv(f"What is {k} plus {k}?", str(2 * k))})
    rows.append({"id": "broken-tags", "image": str(root / "img" / "0.png"),
                 "conversations": _conv("<image><image>\nTwo?", "no")})
    rows.append({"id": "broken-missing", "image": str(root / "img" / "nope.png"),
                 "conversations": _conv("<image>\nWhat colour?", "red")})
    manifest = root / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, manifest, len(rows)


def test_mixed_manifest_trains_in_both_runtimes_with_only_broken_rows_quarantined(ray_local, mixed):
    root, manifest, num_rows = mixed
    losses = {}
    for runtime in ("fused", "disaggregated"):
        cfg = mimo_ray.load_config("tiny", [
            "model.modalities=[video,audio,images]", "train.max_steps=3", f"train.runtime={runtime}",
            f"train.output_dir={root / runtime}", "data.shuffle=false", "data.decode_timeout_s=60",
        ])
        with mimo_ray.Trainer(cfg, data=manifest) as trainer:
            result = trainer.fit()
        losses[runtime] = result["losses"]
        quarantined = [json.loads(line) for line in (root / runtime / "quarantine.jsonl").read_text().splitlines()]
        assert {(q["id"], q["stage"]) for q in quarantined} == {("broken-tags", "tags"), ("broken-missing", "open")}
        consumed = [i for line in (root / runtime / "samples.jsonl").read_text().splitlines()
                    for i in json.loads(line)["ids"]]
        # 3 steps x 8 samples in manifest order (no shuffle), the two broken rows skipped: every kind is trained on.
        assert len(consumed) == 24 and len(set(consumed)) == 24
        assert {i.split("-")[0] for i in consumed} == {"vid", "img", "multi", "text"}
    assert max(abs(a - b) / abs(b) for a, b in zip(losses["disaggregated"], losses["fused"], strict=True)) <= REL


def test_user_modality_decoded_by_a_user_function_in_ray_data(ray_local, tmp_path):
    sys.path.insert(0, str(ROOT))
    from tests.e2e.test_public_api import _example

    depth = _example("custom_modality")
    rows = []
    for k in range(16):
        far = k % 2
        path = tmp_path / f"d{k}.npy"
        np.save(path, np.full((1, 16, 16), 0.8 if far else 0.2, dtype=np.float32))
        rows.append({"id": f"d-{k}", "depth": str(path), "conversations": _conv("<depth>How far?", "far" if far
                                                                                 else "near")})
    rows.insert(3, {"id": "d-corrupt", "depth": str(tmp_path / "missing.npy"),
                    "conversations": _conv("<depth>How far?", "near")})
    rows.insert(5, {"id": "d-text", "conversations": _conv("Say hi", "hi")})  # text-only beside the user modality
    manifest = tmp_path / "depth.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    losses = {}
    for runtime in ("fused", "disaggregated"):
        cfg = mimo_ray.load_config("tiny", {
            "model.modalities": [], "model.modality_tokens": {"depth": 5}, "model.lm.seq_length": 64,
            "data.shuffle": False,
            "train": {"runtime": runtime, "max_steps": 2, "output_dir": str(tmp_path / runtime)},
        })
        spec = depth.depth_model(cfg)
        with mimo_ray.Trainer(cfg, mimo_config=spec, data=manifest, decoders={"depth": depth.read_depth}) as trainer:
            losses[runtime] = trainer.fit()["losses"]
        quarantined = [json.loads(line) for line in (tmp_path / runtime / "quarantine.jsonl").read_text().splitlines()]
        assert [(q["id"], q["stage"]) for q in quarantined] == [("d-corrupt", "decode")]
        assert "modality 'depth': decode function read_depth raised FileNotFoundError" in quarantined[0]["error"]
    assert max(abs(a - b) / abs(b) for a, b in zip(losses["disaggregated"], losses["fused"], strict=True)) <= REL


def test_a_run_from_a_spec_factory_resumes_and_infers_from_the_command_line(ray_local, tmp_path):
    """``mimo_config="pkg.mod:fn"`` and ``data.decoders`` are recorded in the run's config: ``jobs/train.py
    --resume`` and ``jobs/infer.py`` rebuild the user's model and decode its modality with nothing else given."""
    sys.path.insert(0, str(ROOT))
    from jobs import infer as infer_job
    from jobs import train as train_job

    rows = []
    for k in range(12):
        path = tmp_path / f"d{k}.npy"
        np.save(path, np.full((1, 16, 16), 0.8 if k % 2 else 0.2, dtype=np.float32))
        rows.append({"id": f"d-{k}", "depth": str(path),
                     "conversations": _conv("<depth>How far?", "far" if k % 2 else "near")})
    manifest = tmp_path / "depth.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = mimo_ray.load_config("tiny", {
        "model.modalities": [], "model.modality_tokens": {"depth": 5}, "model.lm.seq_length": 64,
        "data.decoders": {"depth": "examples.custom_modality:read_depth"},  # importable from the repo root
        "train": {"runtime": "fused", "max_steps": 2, "output_dir": str(run), "ckpt_interval": 1},
    })
    with mimo_ray.Trainer(cfg, mimo_config="examples.custom_modality:depth_model", data=manifest) as trainer:
        first = trainer.fit()["losses"]
    saved = mimo_ray.load_config(run / "config.yaml")
    assert saved.model.spec_factory == "examples.custom_modality:depth_model" and saved.model.modalities == ["depth"]
    summary = train_job.main(["--config", str(run / "config.yaml"), "--resume", "--max-steps", "4",
                              "--data-path", str(manifest)])
    assert summary["steps"] == 4 and summary["resumed_from"].endswith("step_0000002")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics if m.get("split") == "train"][:2] == first
    out = tmp_path / "preds.jsonl"
    infer_job.main(["--checkpoint", str(run), "--data-path", str(manifest), "--output", str(out),
                    "--runtime", "fused", "--infer.max_new_tokens=4"])
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(p["id"] for p in preds) == sorted(r["id"] for r in rows)
    assert all(p["prediction"] is not None and p["num_generated_tokens"] > 0 for p in preds)
