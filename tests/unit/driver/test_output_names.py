"""Output-task inference writes each row's PNG / WAV under the media folder with a name that cannot collide with
another id's or escape the folder, and the JSONL row names the file (DESIGN.md C12)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from mimo_ray.config_cli import load_config
from mimo_ray.data.tokenizer import ChatTokenizer
from mimo_ray.driver.output_infer import run_output_inference
from mimo_ray.media.files import read_png
from mimo_ray.media.output_files import output_file_name, write_output

IDS = ["a.1", "a.2", "a_1", "A.1", "../evil", "/abs", "sub/dir/x", "ünïcödé", "日本", "", ".hidden", "x" * 300]


def test_names_are_distinct_flat_and_keep_the_readable_part():
    names = [output_file_name(i, ".png") for i in IDS]
    assert len(set(names)) == len(IDS) and len({n.lower() for n in names}) == len(IDS)
    for name in names:
        stem, digest = name[: -len(".png")].rsplit("-", 1)
        assert len(digest) == 12 and "/" not in name and "\\" not in name and not name.startswith(".")
        assert len(name) <= 60 + 1 + 12 + 4
    assert names[0].startswith("a_1-") and names[4].startswith("_evil-") and names[5].startswith("_abs-")
    assert names[7].startswith("unicode-") and names[8].startswith("row-")
    assert output_file_name("a.1", ".wav") == names[0][:-4] + ".wav"  # stable across calls and outputs


def test_write_output_stays_under_the_folder(tmp_path):
    folder = tmp_path / "media"
    folder.mkdir()
    written = []
    for k, rid in enumerate(IDS):
        image = np.full((3, 8, 8), k / len(IDS), dtype=np.float32)
        written.append(write_output("image_out", image, folder, rid, None))
    wav = write_output("audio_out", np.zeros(160, dtype=np.float32), folder, "../evil", load_config("tiny").model
                       .outputs.audio_out)  # fmt: skip
    assert all(p.resolve().parent == folder.resolve() for p in [*written, wav])
    assert sorted(p.name for p in folder.iterdir()) == sorted({p.name for p in [*written, wav]})
    assert len(list(folder.iterdir())) == len(IDS) + 1 and sorted(tmp_path.iterdir()) == [folder]
    for k, path in enumerate(written):  # each id's own content, none overwritten by another id's
        assert read_png(str(path))[0, 0, 0] == round(k / len(IDS) * 255)
    assert soundfile.info(str(wav)).samplerate == 16000


class FakeOutputRuntime:
    """Decodes every prompt batch to images whose pixels encode the row's position in the manifest."""

    def __init__(self) -> None:
        self.seen = 0

    def decode_outputs(self, batches):  # noqa: ANN001, ANN201
        for input_ids in batches:
            n = len(input_ids)
            values = (self.seen + np.arange(n, dtype=np.float32))[:, None, None, None] / 100.0
            self.seen += n
            yield {"image_out": np.broadcast_to(values, (n, 3, 8, 8)).copy()}


def test_output_inference_names_files_safely_and_the_jsonl_names_them(tmp_path):
    cfg = load_config("tiny", ["model.outputs.image_out.enabled=true", "model.outputs.image_out.image_size=8",
                               "model.modalities=[]", "infer.batch_size=4"])  # fmt: skip
    ids = ["a.1", "a.2", "../evil", "/abs", "ünïcödé"]
    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text("".join(json.dumps({"id": rid, "conversations": [
        {"from": "human", "value": f"Draw {k}."}, {"from": "gpt", "value": "<image_gen>"}]}) + "\n"
        for k, rid in enumerate(ids)))  # fmt: skip
    out_dir = tmp_path / "preds"
    out_dir.mkdir()
    out = out_dir / "out.jsonl"
    summary = run_output_inference(cfg, Path("ckpt"), ChatTokenizer.from_config(cfg), str(manifest), out, set(),
                                   FakeOutputRuntime())  # fmt: skip
    assert summary["written"] == 5 and summary["image_out"] == 5
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    media = out_dir / "out_media"
    files = [out_dir / r["file"] for r in rows]
    assert len(set(files)) == 5 and sorted(media.iterdir()) == sorted(files)
    assert all(r["file"] == f"out_media/{output_file_name(r['id'], '.png')}" for r in rows)
    assert all(Path(r["image_out_path"]) == out_dir / r["file"] for r in rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds", "tasks.jsonl"]  # nothing escaped
    assert sorted(p.name for p in out_dir.iterdir()) == ["out.jsonl", "out_media"]
    for k, path in enumerate(files):
        assert read_png(str(path))[0, 0, 0] == pytest.approx(round(k / 100 * 255), abs=1)


def test_the_reported_ids_get_four_distinct_contained_files(tmp_path):
    """Issue 22 item 2: ``../../escaped``, ``a.1``, ``a.2``, ``sub/dir/x`` → four files, all inside the media folder."""
    cfg = load_config("tiny", ["model.outputs.image_out.enabled=true", "model.outputs.image_out.image_size=8",
                               "model.modalities=[]", "infer.batch_size=2"])  # fmt: skip
    ids = ["../../escaped", "a.1", "a.2", "sub/dir/x"]
    manifest = tmp_path / "tasks.jsonl"
    manifest.write_text("".join(json.dumps({"id": rid, "conversations": [
        {"from": "human", "value": f"Draw {k}."}, {"from": "gpt", "value": "<image_gen>"}]}) + "\n"
        for k, rid in enumerate(ids)))  # fmt: skip
    out = tmp_path / "preds" / "out.jsonl"
    out.parent.mkdir()
    summary = run_output_inference(cfg, Path("ckpt"), ChatTokenizer.from_config(cfg), str(manifest), out, set(),
                                   FakeOutputRuntime())  # fmt: skip
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["written"] == 4 and [r["id"] for r in rows] == ids
    files = sorted((out.parent / "out_media").iterdir())
    assert len(files) == 4 and sorted(out.parent / r["file"] for r in rows) == files
    assert all(f.resolve().parent == (out.parent / "out_media").resolve() for f in files)
    assert {f.name.split("-")[0] for f in files} == {"_escaped", "a_1", "a_2", "sub_dir_x"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds", "tasks.jsonl"]  # nothing escaped
