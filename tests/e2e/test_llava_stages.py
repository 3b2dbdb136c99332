"""LLaVA's two-stage recipe end to end through the jobs, on LLaVA-format JSON-array manifests:

stage 1 (projector only, lr 1e-3) on image rows resolved against --data.image_folder, with broken rows that alone are
quarantined → stage 2 (--init-from stage 1, a new file, lr 2e-5: a new run at step 0) → export with the projector
(LLaVA's mm_projector keys) → transformers loads the LM. Video rows (LLaVA-Video-178K shape) go through
jobs/validate.py on a video model. Stage 1's file mixes single-image, multi-image (one <image> tag per list entry),
video (--data.video_folder) and text-only rows, as LLaVA's mixes do: all of them train, only the broken rows are
quarantined.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import convert as convert_job  # noqa: E402
from jobs import train as train_job  # noqa: E402
from mimo_ray.cli.validate import validate_manifest  # noqa: E402
from mimo_ray.config_cli import load_config  # noqa: E402
from mimo_ray.driver import checkpoint as ckpt  # noqa: E402
from mimo_ray.driver.init_from import checkpoint_full_state  # noqa: E402
from mimo_ray.media.files import write_png  # noqa: E402
from mimo_ray.observability import read_metrics  # noqa: E402

transformers = pytest.importorskip("transformers")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
# The tiny preset with a LLaMA-shaped LM (so the LM exports), images and video, small fused steps in file order.
MODEL = ["--preset", "tiny", "--runtime", "fused", "--model.modalities=[images,video]", "--data.shuffle=false",
         "--model.lm.swiglu=true",
         "--model.lm.normalization=RMSNorm", "--model.lm.add_bias_linear=false", "--data.micro_batch_size=4",
         "--data.global_batch_size=4", "--train.warmup_steps=1"]  # fmt: skip


def image_rows(root: Path, prefix: str, n: int) -> list[dict]:
    """LLaVA-1.5 mix665k-shaped rows; images 48x32 (non-square: padded to square by data.image_aspect=pad)."""
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 3]
        rel = f"coco/train2017/{prefix}{i:06d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_png(root / rel, np.full((32, 48, 3), COLOURS[colour], np.uint8))
        rows.append({"id": f"{prefix}{i:06d}", "image": rel, "model": "gpt", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"}, {"from": "gpt", "value": colour}]})
    return rows


def mixed_rows(images: Path, videos: Path, synthetic_module) -> list[dict]:
    """LLaVA mix shapes beside the single-image rows: multi-image, video (LLaVA-Video) and text-only rows."""
    made = synthetic_module.make_synthetic(str(videos.parent / "syn"), 2, seconds=1.0, size=(48, 32),
                                           val_fraction=0.0)
    clips = [json.loads(line) for line in Path(made["train_manifest"]).read_text().splitlines()]
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, clip in enumerate(clips):
        src = Path(made["train_manifest"]).parent / clip["video"]
        (videos / src.name).write_bytes(src.read_bytes())
        rows.append({"id": f"vid-{i}", "video": src.name, "conversations": [
            {"from": "human", "value": "<video>\nWhat colour is the ball?"}, {"from": "gpt", "value": clip["colour"]}]})
    pics = image_rows(images, "mi-", 4)
    for i in range(2):
        rows.append({"id": f"multi-{i}", "image": [pics[2 * i]["image"], pics[2 * i + 1]["image"]], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nDo the two pictures share a colour?"},
            {"from": "gpt", "value": "no"}]})
        rows.append({"id": f"text-{i}", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                          {"from": "gpt", "value": str(i)}]})
    return rows


def test_two_stages_with_init_from_then_export(tmp_path: Path, ray_local, synthetic_module) -> None:
    images = tmp_path / "images"
    good = image_rows(images, "s1-", 12)
    mixed = mixed_rows(images, tmp_path / "videos", synthetic_module)
    broken = ["not a row", {"image": "coco/x.png", "conversations": good[0]["conversations"]},
              {"id": "gone", "image": "coco/train2017/missing.png", "conversations": good[0]["conversations"]},
              {"id": "two-tags-one-image", "image": good[0]["image"], "conversations": [
                  {"from": "human", "value": "<image><image> same?"}, {"from": "gpt", "value": "yes"}]}]
    manifest = tmp_path / "stage1.json"
    manifest.write_text(json.dumps(mixed + good[:5] + broken + good[5:], indent=1))
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    s1 = train_job.main([*MODEL, "--data-path", str(manifest), f"--data.image_folder={images}",
                         f"--data.video_folder={tmp_path / 'videos'}", "--max-steps", "4",
                         "--lr", "1e-3", "--train.min_lr=0", "--model.freeze=[vision,lm]",
                         "--output-dir", str(run1)])  # fmt: skip
    assert s1["steps"] == 4 and s1["frozen_parts"] == ["vision", "lm"]
    bad = [json.loads(line) for line in (run1 / "quarantine.jsonl").read_text().splitlines()]
    # only the broken rows
    assert sorted(r["id"] for r in bad) == ["gone", "stage1.json:11", "stage1.json:12", "two-tags-one-image"]
    by_id = {r["id"]: r for r in bad}
    assert "row 11 is not a JSON object" in by_id["stage1.json:11"]["error"]
    assert "row 12 has no 'id'" in by_id["stage1.json:12"]["error"]
    assert by_id["two-tags-one-image"]["stage"] == "tags"
    assert "modality 'images': 2 <image> tag(s) but 1 'image' item(s)" in by_id["two-tags-one-image"]["error"]
    consumed = [i for line in (run1 / "samples.jsonl").read_text().splitlines() for i in json.loads(line)["ids"]]
    assert len(consumed) == 16 and {i.split("-")[0] for i in consumed} == {"vid", "multi", "text", "s1"}
    assert by_id["gone"]["stage"] == "open" and by_id["gone"]["path"] == str(images / "coco/train2017/missing.png")

    manifest2 = tmp_path / "stage2.json"
    manifest2.write_text(json.dumps(image_rows(images, "s2-", 8)))
    s2 = train_job.main([*MODEL, "--data-path", str(manifest2), f"--data.image_folder={images}", "--max-steps", "2",
                         "--lr", "2e-5", "--train.min_lr=0", "--model.freeze=[vision]", "--init-from", str(run1),
                         "--output-dir", str(run2)])  # fmt: skip
    assert s2["steps"] == 2 and s2["run_id"] != s1["run_id"] and s2["quarantined"] == 0
    assert s2["init_from"]["checkpoint"] == str(ckpt.resolve(run1))
    train = [r for r in read_metrics(run2 / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and train[0]["lr"] == pytest.approx(2e-5)  # warm-up 1 step
    first, second = (checkpoint_full_state(ckpt.resolve(r), swiglu=True) for r in (run1, run2))
    proj = [k for k in first if ".input_projections." in k]
    vision = [k for k in first if k.startswith("modality_submodules.images.encoders.")]
    assert proj and vision and all(torch.equal(first[k], second[k]) for k in vision)  # frozen, taken from stage 1
    assert any(not torch.equal(first[k], second[k]) for k in proj)  # stage 2 trained on from there

    out = convert_job.main(["export", "--checkpoint", str(run2), "--output", str(tmp_path / "hf")])
    mm = load_file(out["mm_projector"])
    root = "modality_submodules.images.input_projections.0.encoder."
    assert torch.equal(mm["model.mm_projector.0.weight"], second[root + "linear_fc1.weight"])
    assert torch.equal(mm["model.mm_projector.2.bias"], second[root + "linear_fc2.bias"])
    _, info = transformers.AutoModelForCausalLM.from_pretrained(out["lm"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_llava_video_rows_validate(tmp_path: Path, ray_local, synthetic_module) -> None:
    videos = tmp_path / "videos"
    made = synthetic_module.make_synthetic(str(tmp_path / "syn"), 4, seconds=1.0, size=(48, 32), val_fraction=0.0)
    rows = [json.loads(line) for line in Path(made["train_manifest"]).read_text().splitlines()]
    videos.mkdir()
    manifest = []
    for row in rows:  # LLaVA-Video-178K shape: "video" relative to the video root, no audio field
        src = Path(made["train_manifest"]).parent / row["video"]  # absolute paths stay absolute under "/"
        (videos / src.name).write_bytes(src.read_bytes())
        manifest.append({"id": row["id"], "video": src.name, "data_source": "syn",
                         "conversations": [{"from": "human", "value": "<video>\nWhat colour is the ball?"},
                                           {"from": "gpt", "value": row["colour"]}]})  # fmt: skip
    manifest.insert(2, {"id": "no-conv", "video": "x.mp4"})
    path = tmp_path / "video.json"
    path.write_text(json.dumps(manifest))
    cfg = load_config("tiny", ["--model.modalities=[video]", f"--data.video_folder={videos}"])
    report = validate_manifest(cfg, str(path))
    assert report["rows"] == 5 and report["ok"] == 4 and [r["id"] for r in report["bad_rows"]] == ["no-conv"]


def test_init_from_a_fused_run_into_disaggregated_lm_tp2(tmp_path: Path, ray_local) -> None:
    # Stage 1 fused (random data); stage 2 on encoder + two LM tensor-parallel actors: each LM rank slices the full
    # LM itself, and the parameters at step 0 (TP-gathered) equal stage 1's bit for bit.
    from mimo_ray.config_cli import load_config as load
    from mimo_ray.driver.train_loop import TrainLoop

    base = ["--data.micro_batch_size=2", "--data.global_batch_size=2", "--train.min_lr=0"]
    train_job.main(["--preset", "tiny", "--runtime", "fused", *base, "--max-steps", "2", "--output-dir",
                    str(tmp_path / "s1")])  # fmt: skip
    cfg = load("tiny", [*base, "--runtime", "disaggregated", "parallel.lm_tp=2", "--max-steps", "1", "--lr", "2e-5",
                        "--init-from", str(tmp_path / "s1"), "--output-dir", str(tmp_path / "s2")])  # fmt: skip
    seen: dict[str, torch.Tensor] = {}

    def hook(step: int) -> None:
        if step == 0:
            seen.update(loop.runtime.named_parameters_full())

    with TrainLoop.build(cfg, on_step_start=hook) as loop:
        summary = loop.run()
    source = checkpoint_full_state(ckpt.resolve(tmp_path / "s1"), swiglu=False)
    assert summary["steps"] == 1 and len(seen) > 50
    for name, value in seen.items():
        assert torch.equal(value, source[name]), name
    assert sorted(p.name for p in (ckpt.resolve(tmp_path / "s2") / "lm").iterdir()) == ["tp0.pt", "tp1.pt"]
