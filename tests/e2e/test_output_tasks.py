"""Output tasks end to end through the jobs: synthetic draw/play tasks → `jobs/train.py` on the `*_out.jsonl`
manifests → `jobs/infer.py` writes PNG/WAV files referenced from the predictions JSONL.

Measured (1000 fused steps at lr 3e-3 (cosine), 72 train / 24 val tasks, 2 cores, ~50 s; 12/12 for 4 seeds, 600 steps
gave 9-12/12 depending on the seed): dominant colour 12/12 = 100 % (chance 25 %),
peak frequency within ±8 % of the requested note 12/12 (C 260 Hz, F 352, A 444, E 654 for 261.6 / 349.2 / 440 /
659.3). Disaggregated and fused training give the same losses; both inference runtimes write identical files.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import infer as infer_job  # noqa: E402
from jobs import train as train_job  # noqa: E402
from mimo_ray.data.output_tasks import read_png  # noqa: E402
from mimo_ray.observability import read_metrics  # noqa: E402

OVERRIDES = [
    "model.modalities=[]",
    "model.lm.seq_length=40",
    "model.outputs.image_out.enabled=true",
    "model.outputs.image_out.loss=mse",
    "model.outputs.image_out.loss_weight=50",
    "model.outputs.audio_out.enabled=true",
    "model.outputs.audio_out.loss=mse",
    "model.outputs.audio_out.loss_weight=20",
    "data.micro_batch_size=8",
    "data.global_batch_size=8",
    "train.grad_clip=0",
    "train.warmup_steps=20",
    "train.min_lr=1e-4",
    "train.eval_interval=0",
    "train.ckpt_interval=0",
]
STEPS = 1000
BAND = 0.08  # the four notes are >= 25 % apart, so ±8 % bands do not overlap


def dominant_colour(image: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """Palette colour nearest to the mean of the brightest 10 % of pixels (the drawn shape, not the background)."""
    pixels = image.reshape(-1, 3).astype(float)
    bright = pixels.max(axis=1)
    mean = pixels[bright >= np.quantile(bright, 0.9)].mean(axis=0)
    names = list(palette)
    return names[int(np.argmin([((np.array(palette[n]) - mean) ** 2).sum() for n in names]))]


def peak_hz(wave: np.ndarray, rate: int) -> float:
    return float(np.abs(np.fft.rfft(wave * np.hanning(len(wave)))).argmax()) * rate / len(wave)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, synthetic_module):
    root = tmp_path_factory.mktemp("out_tasks")
    syn = synthetic_module
    summary = syn.make_synthetic(root / "syn", 1, seconds=0.5, output_tasks=96, val_fraction=0.25)
    return syn, summary


def _train(out, summary, runtime, steps, *extra):
    return train_job.main([
        "--preset", "tiny", "--runtime", runtime, "--max-steps", str(steps), "--output-dir", str(out), "--lr", "3e-3",
        "--data-path", summary["train_out_manifest"], *OVERRIDES, *extra,
    ])  # fmt: skip


def _infer(run, manifest, output, runtime):
    return infer_job.main(["--checkpoint", str(run), "--data-path", str(manifest), "--output", str(output),
                           "--runtime", runtime, "--infer.batch_size=8"])  # fmt: skip


def test_generated_images_and_tones_follow_the_prompt(ray_local, tasks, tmp_path):
    syn, summary = tasks
    train_summary = _train(tmp_path / "run", summary, "fused", STEPS)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == STEPS and train_summary["steps"] == STEPS
    assert np.mean(losses[-20:]) < 0.05 * np.mean(losses[:5])

    preds_path = tmp_path / "preds.jsonl"
    # Fused inference: the disaggregated one writes the same files (test_jobs_disaggregated_equal_fused).
    infer_summary = _infer(tmp_path / "run", summary["val_out_manifest"], preds_path, "fused")
    val = _rows(summary["val_out_manifest"])
    preds = _rows(preds_path)
    assert [p["id"] for p in preds] == [r["id"] for r in val]
    assert infer_summary["image_out"] == infer_summary["audio_out"] == 12 and infer_summary["written"] == 24
    colours = notes = 0
    for row, pred in zip(val, preds, strict=True):
        if "colour" in row:
            assert pred["output"] == "image_out" and pred["prompt"] == row["conversations"][0]["value"]
            image = read_png(pred["image_out_path"])
            assert image.shape == (64, 64, 3)
            colours += dominant_colour(image, syn.COLOURS) == row["colour"]
        else:
            assert pred["output"] == "audio_out"
            wave, rate = soundfile.read(pred["audio_out_path"])
            assert rate == 16000 and len(wave) == 8000
            want = syn.NOTES[row["note"]]
            notes += abs(peak_hz(wave, rate) - want) / want <= BAND
    print(f"\n[outputs] colour {colours}/12 (chance 25%), pitch in band {notes}/12")
    assert colours >= 9, f"dominant colour right for {colours}/12 (chance 25 %)"
    assert notes >= 9, f"peak frequency within ±{BAND:.0%} for {notes}/12"


def test_jobs_disaggregated_equal_fused(ray_local, tasks, tmp_path):
    _, summary = tasks
    group = ("disaggregated", "--parallel.decoder_placement=group")  # the decoders in their own actor group
    const_lr = ("train.warmup_steps=0", "train.min_lr=3e-3", "train.ckpt_interval=3")  # lr independent of max_steps
    # Colocated decoders in the LM group equal the fused step in tests/exactness/test_output_exactness.py.
    runs = {"fused": ("fused", 5), "group": (*group, 3)}
    for name, (runtime, *extra, steps) in runs.items():
        _train(tmp_path / name, summary, runtime, steps, *const_lr, *extra)
    first_three = read_metrics(tmp_path / "group" / "metrics.jsonl")
    _train(tmp_path / "group", summary, group[0], 5, *const_lr, group[1], "--resume")  # decoder group resumes
    assert read_metrics(tmp_path / "group" / "metrics.jsonl")[:3] == first_three  # kept, not re-run (timings too)
    fused = read_metrics(tmp_path / "fused" / "metrics.jsonl")
    keys = ("loss", "text_loss", "image_out_loss", "audio_out_loss")  # per-decoder losses are logged, and add up
    for name, steps in (("group", 5),):
        dis = read_metrics(tmp_path / name / "metrics.jsonl")
        assert [r["step"] for r in dis] == list(range(1, steps + 1))
        for a, b in zip(dis, fused[:steps], strict=True):
            assert all(abs(a[k] - b[k]) <= 1e-6 * abs(b["loss"]) for k in keys), (name, a, b)
            assert a["image_out_loss"] > 0 and a["audio_out_loss"] > 0 and a["text_loss"] > 0
            assert abs(a["text_loss"] + a["image_out_loss"] + a["audio_out_loss"] - a["loss"]) <= 1e-9 * a["loss"]
    # The decoder group checkpoints its own shard; inference reads it back in either runtime.
    assert (tmp_path / "group" / "checkpoints" / "step_0000005" / "decoders" / "tp0.pt").exists()

    # Inference from the decoder-group checkpoint in both runtimes; a row asking for nothing is reported, not lost.
    manifest = tmp_path / "val_plus_bad.jsonl"
    val = _rows(summary["val_out_manifest"])[:6]
    bad = {"id": "asks-nothing", "conversations": [{"from": "human", "value": "Hello."}]}
    base = Path(summary["val_out_manifest"]).parent
    absolute = [{**r, **{k: str(base / r[k]) for k in ("image_out", "audio_out") if k in r}} for r in val]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [*absolute, bad]))
    outs = {}
    for runtime in ("fused", "disaggregated"):
        _infer(tmp_path / "group", manifest, tmp_path / f"p_{runtime}.jsonl", runtime)
        outs[runtime] = _rows(tmp_path / f"p_{runtime}.jsonl")
    for rows in outs.values():
        assert sorted(r["id"] for r in rows) == sorted([r["id"] for r in val] + ["asks-nothing"])
        err = next(r for r in rows if r["id"] == "asks-nothing")
        assert err["prediction"] is None and err["stage"] == "manifest" and "asks for none" in err["error"]
    for a, b in zip(outs["fused"], outs["disaggregated"], strict=True):
        if "image_out_path" in a:
            np.testing.assert_array_equal(read_png(a["image_out_path"]), read_png(b["image_out_path"]))
        elif "audio_out_path" in a:
            wave_a, wave_b = (soundfile.read(x["audio_out_path"])[0] for x in (a, b))
            np.testing.assert_array_equal(wave_a, wave_b)
