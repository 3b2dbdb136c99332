import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_fused_model, encoder_name, input_shape, tokens_per_sample
from mimo_ray.model.align import align_embeddings
from mimo_ray.model.inputs import random_batch


def _loss(model, batch):
    per_token, mask = model(
        batch["input_ids"], batch["position_ids"], None, batch["loss_mask"], batch["labels"], batch["modality_inputs"]
    )
    return (per_token * mask).sum() / mask.sum(), per_token


@pytest.mark.parametrize("audio", ["whisper", "beats"])
def test_fused_forward_backward_video_audio_text(megatron_world, audio):
    cfg = load_config("tiny", ["--audio-backbone-type", audio])
    model = build_fused_model(cfg)
    batch = random_batch(cfg, 2, seed=0)
    loss, per_token = _loss(model, batch)
    assert per_token.shape == (2, cfg.model.lm.seq_length)
    # Random init over a 384-token vocabulary: cross-entropy close to ln(384) = 5.95.
    assert 5.5 < loss.item() < 6.5
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    enc = model.modality_submodules["audio"].encoders[audio]
    assert any(p.grad.abs().sum() > 0 for p in enc.parameters())


def test_images_modality(megatron_world):
    cfg = load_config("tiny", ["model.modalities=[images]"])
    model = build_fused_model(cfg)
    batch = random_batch(cfg, 2, seed=1)
    assert batch["modality_inputs"]["images"]["clip"]["pixel_values"].shape == (2, 3, 32, 32)
    assert int((batch["input_ids"] == cfg.model.special_token_ids["images"]).sum()) == 2 * 4
    loss, _ = _loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("overrides", "modality"),
    [
        (["--num-frames", "1"], "video"),
        (["--num-frames", "4"], "video"),
        (["--num-frames", "8", "model.vision.tokens_per_frame=1"], "video"),
        (["--num-frames", "8", "model.vision.tokens_per_frame=16"], "video"),
        (["--audio-seq-len", "1"], "audio"),
        (["--audio-seq-len", "25"], "audio"),
        (["--audio-seq-len", "100"], "audio"),
        (["--audio-backbone-type", "beats", "--audio-seq-len", "7"], "audio"),
        (["--audio-backbone-type", "beats", "--audio-seq-len", "96"], "audio"),
    ],
)
def test_tokens_per_sample_matches_encoder_rows(megatron_world, overrides, modality):
    cfg = load_config("tiny", overrides)
    model = build_fused_model(cfg)
    batch_size = 3
    x = torch.randn(batch_size, *input_shape(cfg, modality))
    key = "pixel_values" if modality == "video" else "input_features"
    emb = model.modality_submodules[modality]({encoder_name(cfg.model, modality): {key: x}})
    assert emb.shape == (batch_size * tokens_per_sample(cfg, modality), cfg.model.lm.hidden_size)


def test_rows_are_batch_major(megatron_world):
    cfg = load_config("tiny")
    model = build_fused_model(cfg).eval()
    x = torch.randn(2, *input_shape(cfg, "video"))
    both = model.modality_submodules["video"]({"clip": {"pixel_values": x}})
    second = model.modality_submodules["video"]({"clip": {"pixel_values": x[1:]}})
    n = tokens_per_sample(cfg, "video")
    torch.testing.assert_close(both[n:], second, rtol=1e-5, atol=1e-6)


def test_alignment_count_mismatch_and_missing_modality(megatron_world):
    cfg = load_config("tiny")
    model = build_fused_model(cfg)
    batch = random_batch(cfg, 2, seed=2)
    video = batch["modality_inputs"]["video"]["clip"]["pixel_values"]
    batch["modality_inputs"]["video"]["clip"]["pixel_values"] = video[:1]
    with pytest.raises(ValueError, match=r"modality 'video': 32 placeholder tokens in input_ids but 16 embedding rows"):
        _loss(model, batch)
    batch = random_batch(cfg, 2, seed=2)
    del batch["modality_inputs"]["audio"]
    with pytest.raises(ValueError, match=r"input_ids contain 16 'audio' placeholder tokens \(id 262\) but no 'audio'"):
        _loss(model, batch)


def test_align_embeddings_places_rows():
    ids = torch.tensor([[5, 9, 9, 6], [9, 9, 7, 8]])
    text = torch.arange(4, dtype=torch.float32).view(4, 1).expand(4, 2)
    vid = 100 + torch.arange(4, dtype=torch.float32).view(4, 1).expand(4, 2)
    out = align_embeddings({"text": text, "video": vid}, ids, {"video": 9})
    assert out.shape == (4, 2, 2)
    assert out[:, 0, 0].tolist() == [0, 100, 101, 1]
    assert out[:, 1, 0].tolist() == [102, 103, 2, 3]
    with pytest.raises(ValueError, match="no special token id is defined for modality 'audio'"):
        align_embeddings({"text": text, "audio": vid}, ids, {"video": 9})


def test_twenty_adamw_steps_halve_the_loss(megatron_world):
    cfg = load_config("tiny")
    model = build_fused_model(cfg)
    batch = random_batch(cfg, 4, seed=3, text_len=32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss, _ = _loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_same_seed_same_weights_and_parts_match_fused(megatron_world):
    from mimo_ray.model import build_encoder_part, build_lm_part

    cfg = load_config("tiny")
    fused = build_fused_model(cfg).state_dict()
    enc = build_encoder_part(cfg).state_dict()
    lm = build_lm_part(cfg).state_dict()
    for key, value in enc.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fused[f"modality_submodules.{key}"]), key
    for key, value in lm.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, fused[key]), key
    other = build_fused_model(load_config("tiny", ["--seed", "7"])).state_dict()
    key = "language_model.embedding.word_embeddings.weight"
    assert not torch.equal(other[key], fused[key])
