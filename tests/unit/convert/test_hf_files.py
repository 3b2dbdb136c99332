"""Weight files in every supported layout import to the same checkpoint; bad input names the flag, key and field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mimo_ray.config_cli import load_config
from mimo_ray.convert.importer import import_run
from mimo_ray.parallel.imported_layout import part_file


def _lm_part(step):
    return torch.load(part_file(step, "language_model", 0), weights_only=True)


def test_sharded_safetensors_and_bin_import_identically(hf_dirs, tmp_path):
    src = hf_dirs["llama"]
    state = load_file(src / "model.safetensors")
    keys = sorted(state)
    layouts = {"sharded": tmp_path / "sharded", "bin": tmp_path / "bin"}
    for d in layouts.values():
        d.mkdir()
        for f in src.iterdir():
            if f.name != "model.safetensors":
                (d / f.name).write_bytes(f.read_bytes())
    halves = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, layouts["sharded"] / name)
    index = {"weight_map": {k: n for n, part in halves.items() for k in part}}
    (layouts["sharded"] / "model.safetensors.index.json").write_text(json.dumps(index))
    torch.save(state, layouts["bin"] / "pytorch_model.bin")
    over = ["model.modalities=[]"]
    _, ref = import_run(str(src), None, None, str(tmp_path / "r0"), "tiny", over)
    want = _lm_part(ref)
    for name, d in layouts.items():
        _, step = import_run(str(d), None, None, str(tmp_path / f"r-{name}"), "tiny", over)
        got = _lm_part(step)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want), name


def test_bad_inputs_name_what_is_wrong(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"--lm '.*nowhere' is not a directory"):
        import_run(str(tmp_path / "nowhere"), None, None, str(tmp_path / "r"), "tiny", [])
    with pytest.raises(ValueError, match=r"model_type='clip_vision_model' is not supported; supported LMs"):
        import_run(str(hf_dirs["clip"]), None, None, str(tmp_path / "r"), "tiny", [])
    with pytest.raises(ValueError, match=r"--audio given but|--audio needs 'audio' in model.modalities"):
        import_run(None, None, str(hf_dirs["whisper"]), str(tmp_path / "r2"), "tiny", ["model.modalities=[video]"])
    _, _ = import_run(str(hf_dirs["llama"]), None, None, str(tmp_path / "r3"), "tiny", ["model.modalities=[]"])
    with pytest.raises(ValueError, match="already holds checkpoints"):
        import_run(str(hf_dirs["llama"]), None, None, str(tmp_path / "r3"), "tiny", ["model.modalities=[]"])


@pytest.mark.parametrize(("override", "message"), [
    ("model.vision.feature_layer=-3", r"model.vision.feature_layer=-3 must be within \[-2, -1\]"),
    ("model.vision.activation=relu", r"model.vision.activation='relu' is not allowed"),
    ("model.freeze=[decoder]", r"model.freeze\[\]='decoder' is not allowed"),
    ("model.lm.num_query_groups=3", r"model.lm.num_query_groups=3 must divide"),
    ("model.lm.norm_epsilon=0", r"model.lm.norm_epsilon=0.0 is not allowed"),
])
def test_new_knobs_are_validated(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("tiny", [override])


def test_defaults_keep_todays_model():
    cfg = load_config("tiny")
    lm, v = cfg.model.lm, cfg.model.vision
    assert (lm.norm_epsilon, lm.qkv_bias, lm.rope_scaling_factor, lm.make_vocab_size_divisible_by) == (1e-5, False,
                                                                                                        None, 1)
    assert lm.padded_vocab_size(2) == lm.vocab_size == 384
    assert (v.activation, v.feature_layer, v.drop_class_token, v.built_layers) == ("gelu", -1, True, v.num_layers)
    assert cfg.model.freeze == [] and cfg.data.chat_template is None


def test_an_import_records_only_the_modalities_it_was_given_and_an_lm_alone_is_prompted_without_media(
    hf_dirs, tmp_path, ray_local
):
    """Issue 22 item 1: an LM imported alone is a text-only model, and ``jobs/infer.py --prompt`` needs no media."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from jobs import infer as infer_job

    cfg, _ = import_run(str(hf_dirs["llama"]), None, None, str(tmp_path / "lm"), "tiny", [])
    assert cfg.model.modalities == [] and load_config(str(tmp_path / "lm" / "config.yaml")).model.modalities == []
    cfg_v, _ = import_run(str(hf_dirs["llama"]), str(hf_dirs["clip"]), None, str(tmp_path / "lmv"), "tiny", [])
    assert cfg_v.model.modalities == ["video"]  # the preset's vision modality, no audio without --audio
    out = tmp_path / "p.jsonl"
    summary = infer_job.main(["--checkpoint", str(tmp_path / "lm"), "--prompt", "the cat sat on", "--chat-template",
                              "none", "--infer.max_new_tokens=3", "--output", str(out), "--runtime", "fused"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["written"] == 1 and summary["quarantined"] == 0
    assert rows[0]["id"] == "prompt-0" and rows[0]["prediction"] is not None and rows[0]["num_generated_tokens"] > 0
