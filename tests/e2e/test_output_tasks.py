"""Output tasks end to end: synthetic draw/play tasks → short fused CPU training → generated PNG/WAV on the val split.

Measured (600 steps, 72 train / 24 val tasks, 2 cores, ~25 s): dominant colour 12/12 = 100 % (chance 25 %), peak
frequency within ±8 % of the requested note 12/12 (C 260 Hz, F 352, A 444, E 654 for 261.6 / 349.2 / 440 / 659.3).
"""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import soundfile
import torch

from mimo_ray.config import load_config
from mimo_ray.data.output_tasks import OutputTaskBatches, read_output_rows, read_png
from mimo_ray.model.output_generate import generate_outputs
from mimo_ray.runtime.fused import FusedRuntime

ROOT = Path(__file__).resolve().parents[2]
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
    "train.runtime=fused",
    "train.grad_clip=0",
]
STEPS = 600
BAND = 0.08  # the four notes are >= 25 % apart, so ±8 % bands do not overlap


def _make_synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", ROOT / "datasets" / "make_synthetic.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_synthetic", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def dominant_colour(image: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    """Palette colour nearest to the mean of the brightest 10 % of pixels (the drawn shape, not the background)."""
    pixels = image.reshape(-1, 3).astype(float)
    bright = pixels.max(axis=1)
    mean = pixels[bright >= np.quantile(bright, 0.9)].mean(axis=0)
    names = list(palette)
    return names[int(np.argmin([((np.array(palette[n]) - mean) ** 2).sum() for n in names]))]


def peak_hz(wave: np.ndarray, rate: int) -> float:
    return float(np.abs(np.fft.rfft(wave * np.hanning(len(wave)))).argmax()) * rate / len(wave)


def test_generated_images_and_tones_follow_the_prompt(megatron_world, tmp_path):
    syn = _make_synthetic()
    summary = syn.make_synthetic(tmp_path / "syn", 1, seconds=0.5, output_tasks=96, val_fraction=0.25)
    train = read_output_rows(summary["train_out_manifest"])
    val = read_output_rows(summary["val_out_manifest"])
    assert all(Path(r.get("image_out") or r["audio_out"]).exists() for r in train + val)

    cfg = load_config("tiny", OVERRIDES)
    torch.manual_seed(0)
    rt = FusedRuntime(cfg)
    rt.set_data_iterators([OutputTaskBatches(cfg, train, cfg.data.micro_batch_size, seed=0)])
    first = rt.train_step(None, lr=2e-3)["loss"]
    for _ in range(STEPS - 1):
        last = rt.train_step(None, lr=2e-3)["loss"]
    assert last < 0.05 * first

    preds = generate_outputs(rt.stage.module, cfg, val, tmp_path / "gen")
    assert [p["id"] for p in preds] == [r["id"] for r in val]
    colours = notes = 0
    num_images = num_tones = 0
    for row, pred in zip(val, preds, strict=True):
        if "colour" in row:
            image = read_png(pred["image_out_path"])
            assert image.shape == (64, 64, 3)
            num_images += 1
            colours += dominant_colour(image, syn.COLOURS) == row["colour"]
        else:
            wave, rate = soundfile.read(pred["audio_out_path"])
            assert rate == 16000 and len(wave) == 8000
            num_tones += 1
            want = syn.NOTES[row["note"]]
            notes += abs(peak_hz(wave, rate) - want) / want <= BAND
    print(f"\n[outputs] colour {colours}/{num_images} (chance 25%), pitch in band {notes}/{num_tones}")
    assert num_images == num_tones == 12
    assert colours >= 9, f"dominant colour right for {colours}/{num_images} (chance 25 %)"
    assert notes >= 9, f"peak frequency within ±{BAND:.0%} for {notes}/{num_tones}"
    rt.close()
