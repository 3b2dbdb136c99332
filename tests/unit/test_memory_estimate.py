"""The per-GPU memory arithmetic of jobs/gpu_check.py: exact closed-form parameter counts (checked against built
models), bytes per parameter of both optimizers (the local one against MixedPrecisionOptimizer's own count), and the
avlm-7b fit at LM TP=2."""

from __future__ import annotations

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_encoder_part, build_lm_part
from mimo_ray.perf.memory import (
    H100_80GB_BYTES,
    RESERVE_BYTES,
    GiB,
    group_estimates,
    memory_table,
    optimizer_bytes_per_param,
)
from mimo_ray.perf.param_count import lm_params, modality_params

VARIANT = ["model.lm.normalization=RMSNorm", "model.lm.swiglu=true", "model.lm.add_bias_linear=false",
           "model.lm.untie_embeddings_and_output_weights=true", "model.lm.num_query_groups=2", "model.lm.qkv_bias=true",
           "model.lm.position_embedding_type=learned_absolute", "model.audio.backbone_type=beats",
           "model.vision.feature_layer=-2", "model.vision.projector_type=affine", "model.modalities=[images,audio]"]


@pytest.mark.parametrize("overrides", [[], VARIANT], ids=["tiny", "variant"])
def test_closed_form_counts_equal_built_numel(megatron_world, overrides):
    cfg = load_config("tiny", overrides)
    lm = build_lm_part(cfg)
    assert sum(p.numel() for p in lm.language_model.parameters()) == lm_params(cfg.model.lm).total
    enc = build_encoder_part(cfg)
    for mod in cfg.model.modalities:
        assert sum(p.numel() for p in enc[mod].parameters()) == modality_params(cfg.model, mod), mod


def test_tp_rank_count_equals_an_imported_tp2_shard(tmp_path):
    pytest.importorskip("transformers")
    from mimo_ray.convert.importer import import_run
    from mimo_ray.parallel.imported_layout import part_file
    from tests.hf_tiny import build_hf_dirs

    llama = build_hf_dirs(tmp_path / "hf", ("llama",))["llama"]
    over = ["model.modalities=[]", "parallel.lm_tp=2", "model.lm.make_vocab_size_divisible_by=5"]
    cfg, step = import_run(str(llama), None, None, str(tmp_path / "run"), "tiny", over)
    count = lm_params(cfg.model.lm, 2)
    for rank in range(2):
        shard = torch.load(part_file(step, "language_model", rank), weights_only=True)
        assert sum(t.numel() for t in shard.values()) == count.per_rank


def test_bytes_per_param():
    assert optimizer_bytes_per_param("local").total == 18  # 2 bf16 weight + 4 main grad + 4 master + 8 AdamW
    assert optimizer_bytes_per_param("local", 8).total == 18  # replicated on every DP rank
    assert optimizer_bytes_per_param("local", mixed_precision=False).total == 16
    for dp in (1, 2, 4, 8):
        assert optimizer_bytes_per_param("megatron-distributed", dp).total == 2 + 4 + 12 / dp
    assert optimizer_bytes_per_param("megatron-distributed", 4, mixed_precision=False).total == 4 + 4 + 8 / 4
    with pytest.raises(ValueError, match="not one of local, megatron-distributed"):
        optimizer_bytes_per_param("zero3")
    with pytest.raises(ValueError, match="dp=0"):
        optimizer_bytes_per_param("local", 0)


def test_local_estimate_is_what_the_optimizer_holds(megatron_world):
    from mimo_ray.model.inputs import random_batch
    from mimo_ray.stages import FusedStage

    cfg = load_config("tiny", ["model.modalities=[]", "model.params_dtype=bf16", "model.lm.seq_length=32"])
    stage = FusedStage(cfg)
    stage.setup()
    stats = [stage.forward_backward(random_batch(cfg, 2, seed=1))]
    stage.optimizer_step(1e-3, 1.0, stage.reduce_grads(*stats))
    assert stage.optimizer.bytes_per_param() == optimizer_bytes_per_param("local").total


def test_avlm_7b_at_tp2():
    cfg = load_config("avlm-7b", [])
    lm = lm_params(cfg.model.lm, 2)
    # LLaMA/Vicuna-7B: per layer 4h^2 (q, k, v, o) + 3hf (gate, up, down) + 2h (norms), 32 layers, untied V*h
    # embedding and head, final norm h: 32 * 202,383,360 + 2 * 131,072,000 + 4096 = 6,738,415,616.
    h, f, v = 4096, 11008, 32000
    assert lm.total == 32 * (4 * h * h + 3 * h * f + 2 * h) + 2 * v * h + h == 6_738_415_616
    assert lm.replicated == 32 * 2 * h + h  # the norms; everything else is split over the 2 ranks
    assert lm.per_rank == (lm.total - lm.replicated) // 2 + lm.replicated == 3_369_340_928
    assert abs(lm.per_rank - lm.total / 2) / (lm.total / 2) < 1e-4

    rows = {(r.group, r.impl, r.dp): r for r in group_estimates(cfg, 2, (1, 2, 4, 8))}
    n = lm.per_rank
    act = 32 * 4096 * 4096 * (10 + 24 / 2) + 6 * 4096 * 32000 / 2  # flash attention, micro-batch 1, seq 4096
    local = rows[("lm", "local", 1)]
    assert local.activations == act and local.step_transient == 8 * n
    assert local.total == 18 * n + 8 * n  # the step's transients (26 B/param) exceed the activations
    usable = H100_80GB_BYTES - RESERVE_BYTES
    assert round(local.total / GiB, 1) == 81.6 and round(usable / GiB, 2) == 75.65
    assert not local.fits(H100_80GB_BYTES)
    for dp, want_gib in ((1, 67.8), (2, 49.0), (4, 39.6), (8, 34.9)):
        row = rows[("lm", "megatron-distributed", dp)]
        assert row.total == (2 + 4 + 12 / dp) * n + act
        assert round(row.total / GiB, 1) == want_gib and row.fits(H100_80GB_BYTES)
    # train.optimizer_impl=auto: on GPU every group runs Megatron's distributed optimizer (18 B/param at DP=1, no
    # step transient).
    impl = "megatron-distributed"
    vision, audio = rows[("encoder-video", impl, 1)], rows[("encoder-audio", impl, 1)]
    assert vision.step_transient == 0 and vision.weights + vision.grads + vision.optimizer == 18 * vision.params
    # CLIP ViT-L/14-336 without its post-norm (303,505,408) + MLP projector 1024 -> 4096 -> 4096 (20,979,712).
    assert vision.params == 24 * (12 * 1024**2 + 13 * 1024) + 1024 * 3 * 14**2 + 1024 + 577 * 1024 + 2048 + 20_979_712
    assert vision.params == 324_485_120 and audio.params == 38_708_224
    assert vision.fits(H100_80GB_BYTES) and audio.fits(H100_80GB_BYTES)

    text = memory_table(cfg, 2, preset="avlm-7b").render()
    assert "estimate for an 80 GB H100" in text and "6,738,415,616 parameters" in text
    assert "train.optimizer_impl=auto: a CUDA run uses megatron-distributed in every group" in text
    torch_rows = group_estimates(load_config("avlm-7b", ["train.optimizer_impl=torch"]), 2, (1,))
    assert {r.impl for r in torch_rows if r.group.startswith("encoder")} == {"local"}
    measured = memory_table(cfg, 2, capacity=80 * GiB, preset="avlm-7b").render()
    assert "measured GPU total 80.0 GiB" in measured
