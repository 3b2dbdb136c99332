"""Smoke tests of the benchmark harness: the analytic FLOP formulas against hand-computed numbers for the tiny
preset (and against torch's FLOP counter on the real model), and ``jobs/bench.py step`` producing its table.

Performance numbers are never asserted here: only formulas, shapes of the output and that it runs.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.perf import flops

ROOT = Path(__file__).resolve().parents[2]

# Hand-computed forward FLOPs of ONE sample of the tiny preset (mimo_ray/configs/tiny.yaml):
# LM: 2 layers, h=64, 4 heads (MHA: kv width 2*64), f=4h=256, V=384, s=192, GELU MLP.
LM_LAYER_WEIGHTS = 64 * (64 + 128) + 64 * 64 + 64 * 256 + 256 * 64  # QKV + proj + fc1 + fc2 = 49,152
LM_ATTN = 4 * 192 * 192 * 64  # QK^T + PV per layer = 9,437,184
LM = 2 * (2 * 192 * LM_LAYER_WEIGHTS + LM_ATTN) + 2 * 192 * 64 * 384  # layers + output layer
# ViT per frame: 32 px / 8 px patches = 4x4 = 16 patches + class token = 17 tokens, h=64, f=256, 2 layers; 4 frames.
VIT_ATTN = 4 * 17 * 17 * 64
VIT_FRAME = 2 * 16 * (3 * 8 * 8) * 64 + 2 * (2 * 17 * LM_LAYER_WEIGHTS + VIT_ATTN)  # patch conv + layers
VIDEO = 4 * VIT_FRAME + 2 * (4 * 4) * (64 * 64 + 64 * 64)  # 4 frames + MLP projector on 4 frames x 4 tokens
# Whisper: 2 s at 16 kHz, hop 160 → 200 mel frames (80 mels) → conv stride 2 → 100 positions, h=64, 2 layers.
WHISPER_ATTN = 4 * 100 * 100 * 64
AUDIO = (
    2 * 200 * (3 * 80) * 64  # conv1
    + 2 * 100 * (3 * 64) * 64  # conv2
    + 2 * (2 * 100 * LM_LAYER_WEIGHTS + WHISPER_ATTN)  # layers
    + 2 * 8 * (64 * 64 + 64 * 64)  # MLP projector on audio_seq_len=8 tokens
)
ATTENTION = 2 * LM_ATTN + 4 * 2 * VIT_ATTN + 2 * WHISPER_ATTN  # per sample, every score-matrix term


def test_tiny_flops_match_hand_computed_formula():
    cfg = load_config("tiny")
    per_sample = flops.forward_flops_per_sample(cfg)
    assert per_sample == {"video": VIDEO, "audio": AUDIO, "lm": LM}
    assert (LM, VIDEO, AUDIO) == (66_060_288, 15_796_224, 33_513_472)
    # 3 x forward (backward = 2 x forward) x global batch 8.
    assert flops.train_flops_per_step(cfg) == 3 * 8 * (LM + VIDEO + AUDIO) == 2_768_879_616
    assert sum(flops.train_flops_breakdown(cfg).values()) == flops.train_flops_per_step(cfg)
    assert flops.lm_tokens_per_step(cfg) == 8 * 192
    assert math.isclose(flops.mfu(2e12, 2.0, 2.0), 0.5)


def test_flops_variants_gqa_swiglu_affine_beats():
    cfg = load_config("tiny", ["model.lm.swiglu=true", "model.lm.num_query_groups=2", "model.lm.ffn_hidden_size=96",
                               "model.vision.projector_type=affine", "model.audio.backbone_type=beats"])  # fmt: skip
    per_sample = flops.forward_flops_per_sample(cfg)
    layer = 64 * (64 + 2 * 2 * 16) + 64 * 64 + 2 * 64 * 96 + 96 * 64  # GQA kv 2 groups x 16, gated fc1
    assert per_sample["lm"] == 2 * (2 * 192 * layer + LM_ATTN) + 2 * 192 * 64 * 384
    assert per_sample["video"] == 4 * VIT_FRAME + 2 * 16 * 64 * 64  # affine projector
    # BEATs: 1 + (32000 - 400) // 160 = 198 fbank frames → 12 x (128 / 16 = 8) = 96 patches of 16x16.
    beats = 2 * 96 * 256 * 64 + 2 * (2 * 96 * LM_LAYER_WEIGHTS + 4 * 96 * 96 * 64) + 2 * 8 * (64 * 64 + 64 * 64)
    assert per_sample["audio"] == beats


def test_flops_formula_matches_torch_flop_counter(megatron_world):
    """The matmul/conv part of the formula equals what torch counts on the real tiny model (attention is left out:
    torch's counter does not see the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from mimo_ray.model import build_fused_model
    from mimo_ray.model.inputs import random_batch

    cfg = load_config("tiny")
    model = build_fused_model(cfg)
    batch = random_batch(cfg, 1, seed=0)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
              modality_inputs=batch["modality_inputs"])  # fmt: skip
    counts = counter.get_flop_counts()["Global"]
    counted = sum(v for op, v in counts.items() if str(op).split(".")[-1] in ("mm", "addmm", "bmm", "convolution"))
    assert counted == sum(flops.forward_flops_per_sample(cfg).values()) - ATTENTION


def test_bench_step_fused_table(tmp_path, megatron_world):
    sys.path.insert(0, str(ROOT))
    from jobs.bench import main

    out_file = tmp_path / "bench.json"
    argv = ["step", "--preset", "tiny", "--repeats", "2", "--warmup", "1", "--runtimes", "fused",
            "--peak-tflops", "1.0", "--json", str(out_file), "model.lm.seq_length=64"]  # fmt: skip
    out = main(argv)
    step = out["step"]
    assert step["columns"] == ["runtime", "step ms", "p10 ms", "p90 ms", "tokens/s", "TFLOP/s", "MFU %", "vs fused"]
    assert [r["runtime"] for r in step["records"]] == ["fused"]
    row = step["records"][0]
    assert all(isinstance(row[c], float) and math.isfinite(row[c]) for c in step["columns"][1:])
    assert len(step["extra"]["fused"]["samples_s"]) == 2
    assert step["extra"]["flops_per_step"] == flops.train_flops_per_step(
        load_config("tiny", ["model.lm.seq_length=64"])
    )
    saved = json.loads(out_file.read_text())
    assert saved["step"]["columns"] == step["columns"] and saved["machine"]["cpu_count"] >= 1


def test_bench_rejects_unknown_subcommand():
    sys.path.insert(0, str(ROOT))
    from jobs.bench import main

    with pytest.raises(SystemExit):
        main(["nonsense"])
