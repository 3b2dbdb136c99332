"""Export → transformers loads it; export(import(x)) == x bit for bit; import(export(run)) == run bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mimo_ray.convert.exporter import export_run
from mimo_ray.convert.importer import import_run
from mimo_ray.parallel.imported_layout import part_file

transformers = pytest.importorskip("transformers")

OVER = ["model.modalities=[video,audio]", "model.vision.tokens_per_frame=4", "model.vision.feature_layer=-2",
        "model.audio.clip_seconds=1.0", "model.audio.audio_seq_len=8", "model.lm.seq_length=64",
        "model.lm.make_vocab_size_divisible_by=16"]


def test_export_round_trip_is_bit_equal(hf_dirs, tmp_path):
    lm, vision, audio = (str(hf_dirs[k]) for k in ("llama_small_vocab", "clip", "whisper"))
    cfg, step = import_run(lm, vision, audio, str(tmp_path / "a"), "tiny", OVER)
    dirs = export_run(str(tmp_path / "a"), str(tmp_path / "hf"))
    assert set(dirs) == {"lm", "vision", "audio"}

    got_lm, info = transformers.AutoModelForCausalLM.from_pretrained(dirs["lm"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    tok = transformers.AutoTokenizer.from_pretrained(dirs["lm"])
    assert tok.convert_tokens_to_ids(["<video>", "<audio>", "<image>"]) == [cfg.model.special_token_ids[m] for m in
                                                                           ("video", "audio", "images")]
    assert tok.chat_template is not None
    _, info = transformers.CLIPVisionModel.from_pretrained(dirs["vision"], output_loading_info=True)
    assert not info["missing_keys"]
    _, info = transformers.WhisperForConditionalGeneration.from_pretrained(dirs["audio"], output_loading_info=True)
    assert not info["missing_keys"]

    # Every source tensor comes back bit-equal (the LM's embedding grows by the 3 tag rows, padding trimmed).
    for part, src in (("vision", vision), ("audio", audio), ("lm", lm)):
        before, after = load_file(f"{src}/model.safetensors"), load_file(f"{dirs[part]}/model.safetensors")
        assert set(before) == set(after), part
        for key, value in before.items():
            if key in ("model.embed_tokens.weight", "lm_head.weight"):
                assert after[key].shape[0] == cfg.model.lm.vocab_size == value.shape[0] + 3
                after[key] = after[key][: value.shape[0]]
            assert torch.equal(after[key], value), key

    # Importing the export again gives the same checkpoint files.
    _, step2 = import_run(str(dirs["lm"]), str(dirs["vision"]), str(dirs["audio"]), str(tmp_path / "b"), "tiny", OVER)
    for part, rank in (("video", None), ("audio", None), ("language_model", 0)):
        a = torch.load(part_file(step, part, rank), weights_only=True)
        b = torch.load(part_file(step2, part, rank), weights_only=True)
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in a), part
