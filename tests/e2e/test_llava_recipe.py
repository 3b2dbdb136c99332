"""The llava-avlm-7b recipe at CPU size on tiny random HF models, end to end through the jobs: import (CLIP +
Whisper + LLaMA) → stage 1 (projections only) → stage 2 (projections + LM, same run resumed) → infer with a video
prompt → export → transformers loads every part; the frozen encoders come back bit-equal to their sources."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

transformers = pytest.importorskip("transformers")

from jobs import convert as convert_job  # noqa: E402
from jobs import infer as infer_job  # noqa: E402
from jobs import train as train_job  # noqa: E402
from tests.hf_tiny import build_hf_dirs  # noqa: E402

# The recipe with CPU shapes: what the tiny HF configs do not set, plus fp32 / CPU placement / small batches.
CPU = ["--model.vision.num_frames=2", "--model.vision.tokens_per_frame=4", "--model.audio.clip_seconds=1.0",
       "--model.audio.audio_seq_len=8", "--model.lm.seq_length=96", "--model.params_dtype=fp32",
       "--parallel.use_gpu=false", "--parallel.lm_tp=1", "--data.micro_batch_size=2", "--data.global_batch_size=2",
       "--train.warmup_steps=1", "--train.lr=1e-2", "--train.ckpt_interval=0"]


def test_llava_avlm_recipe_cpu(tmp_path, ray_local):
    from safetensors.torch import load_file

    hf = build_hf_dirs(tmp_path / "hf", ("clip", "whisper", "llama"))
    run = tmp_path / "run"
    convert_job.main(["import", "--lm", str(hf["llama"]), "--vision", str(hf["clip"]), "--audio",
                      str(hf["whisper"]), "--output-dir", str(run), "--preset", "llava-avlm-7b", *CPU])
    config = str(run / "config.yaml")
    s1 = train_job.main(["--config", config, "--resume", "--runtime", "fused", "--max-steps", "2"])
    assert s1["steps"] == 2 and s1["frozen_parts"] == ["vision", "audio", "lm"]
    assert 0 < s1["trainable_params"] < s1["frozen_params"]
    s2 = train_job.main(["--config", config, "--resume", "--runtime", "fused", "--max-steps", "3",
                         "--model.freeze=[vision,audio]"])
    assert s2["steps"] == 3 and s2["trainable_params"] > s1["trainable_params"]

    spec = importlib.util.spec_from_file_location("hf_media", ROOT / "tests" / "unit" / "data" / "conftest.py")
    media = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(media)
    clip = media.write_mp4(tmp_path / "clip.mp4", media.palette_frames(8),
                           audio=(media.tone(440.0, 16000, 1.0), 16000))
    out = tmp_path / "preds.jsonl"
    infer_job.main(["--checkpoint", str(run), "--output", str(out), "--runtime", "fused", "--prompt",
                    "what color is the video ?", "--video", str(clip), "--infer.max_new_tokens=4"])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["id"] == "prompt-0" and row.get("error") is None and isinstance(row["prediction"], str)

    dirs = convert_job.main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "export")])
    lm = transformers.AutoModelForCausalLM.from_pretrained(dirs["lm"])
    transformers.CLIPVisionModel.from_pretrained(dirs["vision"])
    transformers.WhisperForConditionalGeneration.from_pretrained(dirs["audio"])
    for part, src in (("vision", hf["clip"]), ("audio", hf["whisper"])):  # frozen in both stages
        before, after = load_file(src / "model.safetensors"), load_file(Path(dirs[part]) / "model.safetensors")
        assert set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before), part
    src_lm = transformers.AutoModelForCausalLM.from_pretrained(hf["llama"])
    assert not torch.equal(lm.model.norm.weight, src_lm.model.norm.weight)  # the LM trained in stage 2
