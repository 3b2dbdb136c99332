"""Output decoders: shapes, Griffin-Lim pitch, generation-row gathering, config validation, and the fused loss
with outputs = text loss + weighted decoder losses (outputs off: bit-identical to before)."""

import math

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_fused_model
from mimo_ray.model.decoders import OutputDecoders, gather_generation_rows, per_sample_loss, samples_with_output
from mimo_ray.model.inputs import random_batch, with_output_tasks

OUTPUTS = ["model.outputs.image_out.enabled=true", "model.outputs.audio_out.enabled=true", "model.lm.seq_length=96"]


def peak_hz(wave: torch.Tensor, rate: int) -> float:
    spectrum = torch.fft.rfft(wave * torch.hann_window(wave.numel()))
    return float(spectrum.abs().argmax()) * rate / wave.numel()


def test_decoder_shapes():
    cfg = load_config("tiny", OUTPUTS)
    dec = OutputDecoders(cfg.model)
    assert dec.token_ids == {"image_out": 264, "audio_out": 265}
    img = dec.decode("image_out", torch.randn(3 * 4, 64))
    assert img.shape == (3, 3, 64, 64) and float(img.min()) >= 0 and float(img.max()) <= 1
    mel = dec.decode("audio_out", torch.randn(2 * 4, 64))
    spec = cfg.model.outputs.audio_out
    assert mel.shape == (2, spec.n_mels, spec.num_frames)
    assert dec.waveform(mel).shape == (2, spec.num_samples)
    with pytest.raises(ValueError, match="not a multiple of K=4"):
        dec.decode("image_out", torch.randn(5, 64))


def test_griffin_lim_recovers_tone_pitch():
    cfg = load_config("tiny", OUTPUTS)
    dec = OutputDecoders(cfg.model).decoders["audio_out"]
    spec = cfg.model.outputs.audio_out
    t = torch.arange(spec.num_samples) / spec.sample_rate
    for hz in (261.63, 440.0, 880.0):
        wave = 0.5 * torch.sin(2 * math.pi * hz * t)
        back = dec.waveform(dec.target(wave[None]))[0]
        assert abs(peak_hz(back, spec.sample_rate) - hz) / hz < 0.06, (hz, peak_hz(back, spec.sample_rate))


def test_gather_rows_batch_major_and_counts():
    hidden_SBH = torch.arange(4 * 2 * 1, dtype=torch.float32).view(4, 2, 1)
    ids = torch.tensor([[1, 264, 264, 2], [264, 3, 264, 4]])
    rows = gather_generation_rows(hidden_SBH, ids, {"image_out": 264, "audio_out": 265})
    # Sample 0's positions 1, 2 then sample 1's positions 0, 2 (hidden[s, b] = 2 s + b).
    assert rows["image_out"].flatten().tolist() == [2.0, 4.0, 1.0, 5.0] and "audio_out" not in rows
    assert samples_with_output(ids, 264, 2, "image_out") == [1, 1]
    with pytest.raises(ValueError, match="holds 1 generation tokens"):
        samples_with_output(torch.tensor([[264, 0]]), 264, 2, "image_out")


def test_output_config_validation():
    with pytest.raises(ValueError, match="model.outputs.image_out.token_id=261 is also an input"):
        load_config("tiny", ["model.outputs.image_out.enabled=true", "model.outputs.image_out.token_id=261"])
    with pytest.raises(ValueError, match="model.outputs.audio_out.loss"):
        load_config("tiny", ["model.outputs.audio_out.loss=l3"])
    assert load_config("tiny").model.outputs.active() == {}


def test_fused_loss_is_text_plus_weighted_decoder_losses(megatron_world):
    cfg = load_config("tiny", [*OUTPUTS, "model.outputs.image_out.loss_weight=0.5", "model.outputs.audio_out.loss=mse"])
    model = build_fused_model(cfg)
    plain = build_fused_model(load_config("tiny", ["model.lm.seq_length=96"]))
    batch = with_output_tasks(cfg, random_batch(cfg, 3, seed=0), seed=1)
    args = {k: batch[k] for k in ("input_ids", "position_ids", "loss_mask", "labels", "modality_inputs")}
    loss, mask, outs = model(**args, output_targets=batch["output_targets"])
    # Outputs off: no decoder module, and the text loss is bit-identical to the model without outputs.
    assert not any(n.startswith("output_decoders") for n, _ in plain.named_parameters())
    assert torch.equal(plain(**args)[0], loss) and torch.equal(model(**args)[0], loss)
    # Recompute each decoder loss by hand from the hidden states at the generation tokens.
    _, rows = model.forward_lm_rows(
        batch["input_ids"], batch["position_ids"], model.encode(batch["modality_inputs"]), batch["labels"]
    )
    dec = model.output_decoders
    img_t = batch["output_targets"]["image_out"].float() / 255
    want_img = 0.5 * per_sample_loss(dec.decode("image_out", rows["image_out"]), img_t, "l1").sum()
    aud_t = dec.decoders["audio_out"].target(batch["output_targets"]["audio_out"])
    want_aud = ((dec.decode("audio_out", rows["audio_out"]) - aud_t) ** 2).flatten(1).mean(1).sum()
    torch.testing.assert_close(outs["image_out"], want_img, rtol=0, atol=0)
    torch.testing.assert_close(outs["audio_out"], want_aud, rtol=1e-6, atol=0)
    total = (loss * mask).sum() + outs["image_out"] + outs["audio_out"]
    total.backward()
    assert all(p.grad is not None for p in dec.parameters())
    with pytest.raises(ValueError, match="1 samples hold generation tokens but 0 targets"):
        model(**args, output_targets={"image_out": batch["output_targets"]["image_out"][:0]})
