"""The synthetic colour/note data set: counts, balance, valid rows, decodable media, determinism."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mimo_ray.data.audio import load_audio, log_mel, mel_center_frequencies
from mimo_ray.data.video import decode_video


def read_rows(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def dataset(synthetic_module, tmp_path_factory) -> tuple[dict, list[dict], Path]:
    out = tmp_path_factory.mktemp("syn")
    summary = synthetic_module.make_synthetic(out, 32, seconds=1.0, fps=8, size=(32, 32), seed=7)
    rows = read_rows(summary["train_manifest"]) + read_rows(summary["val_manifest"])
    return summary, rows, out


def test_counts_and_balanced_labels(dataset) -> None:
    summary, rows, _ = dataset
    assert (summary["num_train"], summary["num_val"]) == (26, 6)
    assert summary["num_muxed_audio"] == summary["num_separate_audio"] == 16
    assert len({r["id"] for r in rows}) == 32
    assert Counter(r["colour"] for r in rows) == {c: 8 for c in ("red", "green", "blue", "yellow")}
    assert Counter(r["note"] for r in rows) == {n: 8 for n in "CFAE"}
    assert Counter((r["colour"], r["note"]) for r in rows) == {pair: 2 for pair in Counter(
        (c, n) for c in ("red", "green", "blue", "yellow") for n in "CFAE")}  # fmt: skip
    with open(summary["val_manifest"], encoding="utf-8") as f:
        val_colours = Counter(json.loads(line)["colour"] for line in f)
    assert max(val_colours.values()) - min(val_colours.values()) <= 1 and len(val_colours) == 4


def test_rows_follow_the_manifest_format(dataset) -> None:
    _, rows, out = dataset
    for row in rows:
        assert set(row) <= {"id", "video", "audio", "conversations", "colour", "note"}
        human, gpt = row["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<video>\n<audio>\n")
        assert gpt == {"from": "gpt", "value": f"{row['colour']}, {row['note']}"}
        assert row["video"] == f"clips/{row['id']}.mp4" and (out / row["video"]).stat().st_size > 0
        if "audio" in row:
            assert row["audio"] == f"audio/{row['id']}.wav" and (out / row["audio"]).is_file()


def test_media_decode_to_the_labelled_colour_and_note(dataset, synthetic_module) -> None:
    _, rows, out = dataset
    colours = {name: np.array(rgb, dtype=np.float64) for name, rgb in synthetic_module.COLOURS.items()}
    centres = mel_center_frequencies(80)
    for row in rows:
        frames = decode_video(out / row["video"], 4, (32, 32))
        rgb = frames.astype(np.float64).reshape(-1, 3)  # uint8 [T, H, W, 3]
        ball = rgb[rgb.max(axis=1) > 150].mean(axis=0)
        assert min(colours, key=lambda c: np.sum((colours[c] - ball) ** 2)) == row["colour"], row["id"]

        if "audio" in row:
            wave = load_audio(out / row["audio"])
        else:
            wave = load_audio(out / row["video"], from_video=True, expected_seconds=1.0)
        peak_hz = centres[np.argmax(log_mel(wave).mean(axis=1))]
        note = min(synthetic_module.NOTES, key=lambda n: abs(np.log(synthetic_module.NOTES[n] / peak_hz)))
        assert note == row["note"], row["id"]


def test_same_seed_same_manifests_other_seed_differs(synthetic_module, tmp_path) -> None:
    texts = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        summary = synthetic_module.make_synthetic(
            tmp_path / name, 8, seconds=1.0, fps=8, size=(32, 32), seed=seed
        )
        texts.append(Path(summary["train_manifest"]).read_text() + Path(summary["val_manifest"]).read_text())
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]
    # Media are byte-identical too (x264 is run without its history-dependent lookahead on tiny frames).
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 2 + 8 + sum(1 for p in files if p.suffix == ".wav")
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_bad_arguments_name_the_field(synthetic_module, tmp_path) -> None:
    with pytest.raises(ValueError, match="size"):
        synthetic_module.make_synthetic(tmp_path, 4, size=(33, 32))
    with pytest.raises(ValueError, match="num_samples"):
        synthetic_module.make_synthetic(tmp_path, 0)
    with pytest.raises(ValueError, match="val_fraction"):
        synthetic_module.make_synthetic(tmp_path, 4, val_fraction=1.0)


def test_command_line_runs_standalone(repo_root, tmp_path) -> None:
    script = Path(repo_root) / "datasets" / "make_synthetic.py"
    args = [
        "--out",
        str(tmp_path / "cli"),
        "--num-samples",
        "5",
        "--seconds",
        "0.5",
        "--fps",
        "4",
        "--size",
        "16x16",
    ]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["num_train"] + summary["num_val"] == 5 and summary["num_val"] == 1
    bad = subprocess.run(
        [sys.executable, str(script), *args[:4], "--size", "big"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--size" in bad.stderr
