"""C10: bf16/fp16 parameters and activations in every module, fp32 main grads and fp32 master weights, fp16 loss
scaling, and bf16 training that follows fp32 (fused runtime, in-process, one thread)."""

from __future__ import annotations

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch, with_output_tasks
from mimo_ray.runtime.fused import FusedRuntime
from mimo_ray.stages.fused import FusedStage
from mimo_ray.stages.precision import DynamicLossScaler, MixedPrecisionOptimizer, cast_module

SMALL = ["train.runtime=fused", "data.micro_batch_size=2", "data.global_batch_size=4", "model.lm.seq_length=96"]


def _step(stage: FusedStage, mbs: list, lr: float) -> dict:
    stats = [stage.forward_backward(mb) for mb in mbs]
    return {**stage.optimizer_step(lr, stage.cfg.train.grad_clip, stage.reduce_grads(*stats)), "stats": stats}


def test_every_module_runs_in_the_compute_dtype(megatron_world):
    cfg = load_config("tiny", [*SMALL, "data.micro_batch_size=3", "data.global_batch_size=3",
                               "model.params_dtype=bf16", "model.outputs.image_out.enabled=true",
                               "model.outputs.audio_out.enabled=true"])  # fmt: skip
    stage = FusedStage(cfg)
    stage.setup()
    dtypes = {n: p.dtype for n, p in stage.module.named_parameters()}
    assert set(dtypes.values()) == {torch.bfloat16}, [n for n, d in dtypes.items() if d != torch.bfloat16][:5]
    assert "modality_submodules.video.encoders.clip.vit.conv1.weight" in dtypes  # the CLIP stem too
    # The mel transform defines the audio targets: it stays fp32.
    mel = stage.module.output_decoders.decoders["audio_out"].mel
    assert mel.filterbank.dtype == mel.window.dtype == torch.float32
    outputs: dict[str, set] = {}

    def record(module, _inputs, out):
        tensor = out[0] if isinstance(out, tuple) else out
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            outputs.setdefault(type(module).__name__, set()).add(tensor.dtype)

    for module in stage.module.modules():
        module.register_forward_hook(record)
    batch = with_output_tasks(cfg, random_batch(cfg, 3, seed=1), seed=2)  # an image, an audio and a text sample
    stats = stage.forward_backward(batch)
    assert stats["num_tokens"] > 0
    for name in ("Conv2d", "Conv1d", "LayerNorm", "CLIPViTModel", "WhisperEncoder", "MultimodalProjector",
                 "TransformerBlock", "ImageDecoder", "AudioDecoder", "Linear"):  # fmt: skip
        assert outputs[name] == {torch.bfloat16}, (name, outputs[name])
    # fp32 main gradients, no low-precision .grad left behind.
    params = [p for p in stage.module.parameters() if p.requires_grad]
    assert all(p.grad is None for p in params)
    assert {p.main_grad.dtype for p in params if p.main_grad is not None} == {torch.float32}


def test_bf16_loss_curve_follows_fp32(megatron_world):
    """40 steps on the same two micro-batches: bf16 ends within 10 % of fp32 (measured 0.5 %)."""
    curves = {}
    for dtype in ("fp32", "bf16"):
        cfg = load_config("tiny", [*SMALL, f"model.params_dtype={dtype}"])
        runtime = FusedRuntime(cfg)
        mbs = [random_batch(cfg, 2, seed=7 + i) for i in range(2)]
        curves[dtype] = [runtime.train_step(mbs, lr=2e-3)["loss"] for _ in range(40)]
        runtime.close()
    print("\n[bf16 vs fp32] step: " + ", ".join(
        f"{s + 1}: {curves['fp32'][s]:.4f}/{curves['bf16'][s]:.4f}" for s in (0, 9, 19, 29, 39)))  # fmt: skip
    assert curves["bf16"][0] == pytest.approx(curves["fp32"][0], rel=1e-2)
    assert curves["fp32"][-1] < 0.5 * curves["fp32"][0]  # it really learns
    assert abs(curves["bf16"][-1] - curves["fp32"][-1]) <= 0.1 * curves["fp32"][-1]
    assert max(abs(b - f) / f for b, f in zip(curves["bf16"], curves["fp32"], strict=True)) <= 0.1


def test_tiny_learning_rate_still_moves_bf16_weights(megatron_world):
    """lr 1e-5 moves a weight by ~1e-5 per Adam step, below half a bf16 ulp (6e-5 at |w| = 0.02): the fp32 masters
    accumulate it, so after 20 steps the bf16 weights change; plain AdamW on the bf16 tensor never moves them."""
    cfg = load_config("tiny", [*SMALL, "model.params_dtype=bf16", "model.modalities=[video]", "train.weight_decay=0"])
    stage = FusedStage(cfg)
    stage.setup()
    name = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    param = dict(stage.module.named_parameters())[name]
    start = param.detach().clone()
    naive = torch.nn.Parameter(start.clone())
    naive_opt = torch.optim.AdamW([naive], lr=1e-5, weight_decay=0.0, betas=(0.9, 0.95))
    mbs = [random_batch(cfg, 2, seed=3 + i) for i in range(2)]
    for _ in range(20):
        _step(stage, mbs, lr=1e-5)
        naive.grad = stage.full_grads()[name].to(torch.bfloat16)  # the same (pre-clip) gradient, in bf16
        naive_opt.step()
    index = next(i for i, p in enumerate(stage.optimizer.params) if p is param)
    master = stage.optimizer.masters[index]
    # Where |w| >= 0.01 half a bf16 ulp is >= 3e-5, three times the lr: one Adam step cannot cross it.
    big = start.abs() >= 0.01
    moved = (param.detach() != start)[big].float().mean().item()
    naive_moved = (naive.detach() != start)[big].float().mean().item()
    print(f"\n[tiny lr] bf16 elements (|w| >= 0.01) changed: with masters {moved:.3f}, plain AdamW {naive_moved:.3f}")
    assert moved > 0.9
    assert naive_moved < 0.01
    assert torch.equal(param.detach(), master.to(torch.bfloat16))  # the weight is the rounded master
    assert float((master - start.float()).abs().max()) > 1e-4


def test_master_weights_survive_checkpoints(megatron_world, tmp_path):
    cfg = load_config("tiny", [*SMALL, "model.params_dtype=bf16", "model.modalities=[video]"])
    stage = FusedStage(cfg)
    stage.setup()
    mbs = [random_batch(cfg, 2, seed=11 + i) for i in range(2)]
    _step(stage, mbs, lr=1e-3)
    stage.save(str(tmp_path))
    masters = [m.clone() for m in stage.optimizer.masters]
    assert all(m.dtype == torch.float32 for m in masters)
    again = FusedStage(cfg)
    again.setup()
    again.load(str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(again.optimizer.masters, masters, strict=True))
    # Continuing both gives the same step (masters, not the rounded bf16 weights, carry the state).
    out_a, out_b = _step(stage, mbs, lr=1e-3), _step(again, mbs, lr=1e-3)
    assert out_a["grad_norm"] == out_b["grad_norm"]
    assert all(torch.equal(a, b) for a, b in zip(again.optimizer.masters, stage.optimizer.masters, strict=True))


def test_optimizer_memory_per_parameter():
    """Bytes per parameter held for training: fp32 16 (weight, grad, 2 moments), bf16 18 (bf16 weight, fp32 main
    grad, fp32 master, 2 fp32 moments) — Megatron's Float16OptimizerWithFloat16Params layout."""
    cfg = load_config("tiny")
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        module = cast_module(torch.nn.Linear(8, 4), dtype)
        opt = MixedPrecisionOptimizer(module.parameters(), cfg.train)
        module(torch.ones(2, 8, dtype=dtype)).sum().backward()
        opt.step()
        result[dtype] = opt.bytes_per_param()
    assert result == {torch.float32: 16.0, torch.bfloat16: 18.0}


def test_fp16_needs_dynamic_loss_scaling():
    with pytest.raises(ValueError, match=r"model.params_dtype=fp16 needs train.loss_scaling=dynamic"):
        load_config("tiny", ["model.params_dtype=fp16", "train.loss_scaling=none"])
    with pytest.raises(ValueError, match=r"train.loss_scaling='static' is not allowed"):
        load_config("tiny", ["train.loss_scaling=static"])


def test_dynamic_loss_scaler_follows_megatron_rules():
    scaler = DynamicLossScaler(1024.0, window=3, hysteresis=2)
    scaler.update(True)
    assert scaler.scale == 1024.0  # hysteresis: one overflow is tolerated
    scaler.update(True)
    assert scaler.scale == 512.0
    for _ in range(3):
        scaler.update(False)
    assert scaler.scale == 1024.0
    state = scaler.state_dict()
    other = DynamicLossScaler(1.0, window=3)
    other.load_state_dict(state)
    assert other.state_dict() == state


def test_fp16_overflow_skips_the_step_everywhere_then_trains(megatron_world):
    cfg = load_config("tiny", [*SMALL, "model.params_dtype=fp16", "model.modalities=[video]",
                               "train.initial_loss_scale=4096"])  # fmt: skip
    stage = FusedStage(cfg)
    stage.setup()
    mbs = [random_batch(cfg, 2, seed=5 + i) for i in range(2)]
    before = [p.detach().clone() for p in stage.optimizer.params]
    out = _step(stage, mbs, lr=1e-3)  # 4096 x summed per-token gradients overflow fp16 weight gradients
    assert out["skipped"] == 1 and out["loss_scale"] == 4096.0
    assert all(torch.equal(a, p) for a, p in zip(before, stage.optimizer.params, strict=True))
    scales = [out["loss_scale"]]
    for _ in range(8):
        out = _step(stage, mbs, lr=1e-3)
        scales.append(out["loss_scale"])
        if not out["skipped"]:
            break
    assert not out["skipped"] and scales[-1] < 4096.0  # backed off (after 2 overflows each) until they fit
    assert {p.dtype for p in stage.optimizer.params} == {torch.float16}
    assert not all(torch.equal(a, p) for a, p in zip(before, stage.optimizer.params, strict=True))


def test_runtime_reports_the_loss_scale_only_for_fp16(megatron_world):
    for dtype, want in (("fp16", {"loss_scale": 16.0, "skipped_step": 0.0}), ("bf16", {})):
        cfg = load_config("tiny", [*SMALL, f"model.params_dtype={dtype}", "model.modalities=[video]"])
        runtime = FusedRuntime(cfg)
        out = runtime.train_step([random_batch(cfg, 2, seed=1 + i) for i in range(2)], lr=1e-3)
        assert {k: out[k] for k in ("loss_scale", "skipped_step") if k in out} == want
        runtime.close()
