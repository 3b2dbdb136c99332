"""OutputTaskSource: output-task manifests as the driver's data source (order, resume, rank streams, quarantine)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.data.output_source import OutputTaskSource, is_output_manifest
from mimo_ray.data.quarantine import DataQualityError, read_quarantine
from mimo_ray.driver.data_sources import build_data_source
from mimo_ray.media.files import write_png, write_wav

OUT = ["model.outputs.image_out.enabled=true", "model.outputs.audio_out.enabled=true"]


def _rows(root: Path, n: int) -> list[dict]:
    """``n`` tasks alternating draw (64x64 PNG whose red channel is the index) / play (a tone)."""
    (root / "t").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if i % 2 == 0:
            write_png(root / "t" / f"{i}.png", np.full((64, 64, 3), i, dtype=np.uint8))
            rows.append({"id": f"d{i}", "conversations": [{"from": "human", "value": f"Draw {i}."},
                         {"from": "gpt", "value": "<image_gen>"}], "image_out": f"t/{i}.png"})  # fmt: skip
        else:
            write_wav(root / "t" / f"{i}.wav", 0.1 * np.sin(np.arange(8000) * 0.01 * i), 16000)
            rows.append({"id": f"p{i}", "conversations": [{"from": "human", "value": f"Play {i}."},
                         {"from": "gpt", "value": "<audio_gen>"}], "audio_out": f"t/{i}.wav"})  # fmt: skip
    return rows


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(tmp_path: Path, train: str, *extra: str):
    return load_config("tiny", [*OUT, f"data.data_path={train}", f"train.output_dir={tmp_path / 'run'}",
                                "data.micro_batch_size=2", "data.global_batch_size=4", *extra])  # fmt: skip


def _same(a: dict, b: dict) -> bool:
    keys = ("input_ids", "labels", "loss_mask", "position_ids")
    return (
        a["ids"] == b["ids"]
        and all(torch.equal(a[k], b[k]) for k in keys)
        and a["output_targets"].keys() == b["output_targets"].keys()
        and all(torch.equal(a["output_targets"][k], b["output_targets"][k]) for k in a["output_targets"])
    )


def test_detection_and_disabled_outputs_error(tmp_path):
    train = _write(tmp_path / "out.jsonl", _rows(tmp_path, 4))
    plain = _write(tmp_path / "plain.jsonl", [{"id": "a", "video": "a.mp4", "conversations": []}])
    assert is_output_manifest(train) and not is_output_manifest(plain)
    assert not is_output_manifest(tmp_path / "missing.jsonl")
    cfg = load_config("tiny", [f"data.data_path={train}", f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"--data-path .*out\.jsonl.* holds output tasks .*image_out\.enabled=true"):
        build_data_source(cfg, "train")


def test_steps_streams_and_resume_agree(tmp_path):
    rows = _rows(tmp_path, 6)
    cfg = _cfg(tmp_path, _write(tmp_path / "out.jsonl", rows))
    src = build_data_source(cfg, "train")
    assert isinstance(src, OutputTaskSource)
    steps = [src.next_step() for _ in range(5)]  # 20 samples: > 3 epochs of 6 rows
    flat = [mb for step in steps for mb in step]
    assert all(len(mb["ids"]) == 2 for mb in flat)
    for epoch in range(3):  # every epoch visits each row exactly once, in its own order
        ids = [i for mb in flat for i in mb["ids"]][epoch * 6 : epoch * 6 + 6]
        assert sorted(ids) == sorted(r["id"] for r in rows)
    orders = [[i for mb in flat for i in mb["ids"]][e * 6 : e * 6 + 6] for e in range(3)]
    assert len({tuple(o) for o in orders}) > 1, "epochs should be reshuffled"
    # Targets follow their samples: image targets carry their row index, audio targets match their file.
    for mb in flat:
        imgs = mb["output_targets"].get("image_out")
        want = [int(i[1:]) for i in mb["ids"] if i.startswith("d")]
        assert (imgs is None and not want) or [int(x[0, 0, 0]) for x in imgs] == want
    # Rank streams deal the same micro-batches round-robin; a resumed source continues exactly.
    streams = build_data_source(cfg, "train").rank_streams(2)
    got = [next(streams[m % 2]) for m in range(10)]
    assert all(_same(a, b) for a, b in zip(got, flat, strict=True))
    resumed = build_data_source(cfg, "train", start_sample=3 * cfg.data.global_batch_size)
    assert all(_same(a, b) for a, b in zip(resumed.next_step() + resumed.next_step(), flat[6:], strict=True))
    moved = build_data_source(cfg, "train")
    moved.advance(3)
    assert _same(moved.rank_streams(2)[1].__next__(), flat[7])


def test_val_is_finite_in_file_order(tmp_path):
    rows = _rows(tmp_path, 5)
    path = _write(tmp_path / "val.jsonl", rows)
    cfg = _cfg(tmp_path, path, f"data.val_path={path}")
    src = build_data_source(cfg, "val")
    steps = []
    while step := src.next_step():
        steps.append(step)
    assert [[mb["ids"] for mb in s] for s in steps] == [[["d0", "p1"], ["d2", "p3"]], [["d4"]]]
    with pytest.raises(ValueError, match="endless train split"):
        src.rank_streams(1)


def test_bad_rows_are_quarantined_with_their_stage(tmp_path):
    rows = _rows(tmp_path, 8)
    write_png(tmp_path / "t" / "small.png", np.zeros((32, 32, 3), dtype=np.uint8))
    rows += [
        {**rows[0], "id": "missing-file", "image_out": "t/nope.png"},
        {**rows[0], "id": "wrong-size", "image_out": "t/small.png"},
        {**rows[0], "id": "no-tag", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "x"}]},
        {**rows[0]},  # duplicate id d0
    ]
    cfg = _cfg(tmp_path, _write(tmp_path / "out.jsonl", rows), "data.max_bad_fraction=0.4")
    src = build_data_source(cfg, "train")
    assert src.quarantined == 4
    recs = {r["id"]: r for r in read_quarantine(tmp_path / "run" / "quarantine.jsonl")}
    assert recs["missing-file"]["stage"] == "open" and "nope.png: no such file" in recs["missing-file"]["error"]
    assert recs["wrong-size"]["stage"] == "decode" and "32x32" in recs["wrong-size"]["error"]
    assert recs["no-tag"]["stage"] == "tags"
    assert recs["<row 11>"]["stage"] == "manifest" and "duplicate id 'd0'" in recs["<row 11>"]["error"]
    seen = {i for _ in range(4) for mb in src.next_step() for i in mb["ids"]}
    assert seen == {r["id"] for r in rows[:8]}  # every good row still trains
    strict = _cfg(tmp_path / "s", _write(tmp_path / "out.jsonl", rows), "data.max_bad_fraction=0.2")
    with pytest.raises(DataQualityError, match=r"4 of 12 output-task rows are bad"):
        build_data_source(strict, "train")
