"""KV-cache generation: cache == no-cache reference, batch invariance, EOS, sampling, counts.

A tiny LM half is trained a few AdamW steps to continue arithmetic byte progressions, so greedy outputs are varied
(random init just repeats the last token) and depend on attention over earlier positions.
"""

import functools

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_lm_part, tokens_per_sample
from mimo_ray.model.generate import generate, nucleus_mask, sample_next

PAD, BOS = 256, 257
OVERRIDES = ["model.vision.num_frames=1", "model.audio.audio_seq_len=4"]  # 4 video + 4 audio rows per sample
HIDDEN = 64


def _cfg(position: str = "rope", backend: str = "sdpa"):
    return load_config(
        "tiny", [*OVERRIDES, f"model.lm.position_embedding_type={position}", f"model.attention_backend={backend}"]
    )


def _prefix(cfg) -> list[int]:
    ids = cfg.model.special_token_ids
    return [BOS] + [ids["video"]] * tokens_per_sample(cfg, "video") + [ids["audio"]] * tokens_per_sample(cfg, "audio")


def _progressions(cfg, batch: int, seq: int, seed: int) -> torch.Tensor:
    """``[B, S]``: prefix, then bytes ``start, start+k, start+2k, ...`` with k in 1..3 per sample."""
    gen = torch.Generator().manual_seed(seed)
    prefix = _prefix(cfg)
    rows = []
    for _ in range(batch):
        start, step = int(torch.randint(0, 200, (1,), generator=gen)), int(torch.randint(1, 4, (1,), generator=gen))
        rows.append(prefix + [(start + step * i) % 256 for i in range(seq - len(prefix))])
    return torch.tensor(rows)


def _embeddings(cfg, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch * tokens_per_sample(cfg, m), HIDDEN, generator=gen) for m in ("video", "audio")}


@functools.cache
def _trained(position: str):
    cfg = _cfg(position)
    model = build_lm_part(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch, seq = 8, 40
    positions = torch.arange(seq).expand(batch, seq)
    loss_mask = torch.zeros(batch, seq)
    loss_mask[:, len(_prefix(cfg)) : -1] = 1.0
    for step in range(80):
        ids = _progressions(cfg, batch, seq, seed=step)
        per_token = model.forward_lm(ids, positions, _embeddings(cfg, batch, step), torch.roll(ids, -1, 1))
        loss = (per_token * loss_mask).sum() / loss_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0
    return cfg, model.eval()


def _prompts(cfg, batch: int = 8, seed: int = 1000):
    """Right-padded prompts of distinct lengths (2, 4, 6, ... text bytes) and their modality rows."""
    ids = _progressions(cfg, batch, 48, seed)
    lengths = torch.tensor([len(_prefix(cfg)) + 2 + 2 * b for b in range(batch)])
    for b, n in enumerate(lengths.tolist()):
        ids[b, n:] = PAD
    return ids, lengths, _embeddings(cfg, batch, seed)


def _sample_rows(cfg, emb: dict[str, torch.Tensor], b: int) -> dict[str, torch.Tensor]:
    return {m: rows.view(-1, tokens_per_sample(cfg, m), HIDDEN)[b] for m, rows in emb.items()}


def _greedy(model, ids, lengths, emb, **kw):
    kw = {"max_new_tokens": 12, "eos_id": None, "pad_id": PAD, **kw}
    return generate(model, ids, lengths, emb, **kw)


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_cache_matches_no_cache_reference(megatron_world, position):
    cfg, model = _trained(position)
    ids, lengths, emb = _prompts(cfg)
    cached = _greedy(model, ids, lengths, emb)
    reference = _greedy(model, ids, lengths, emb, use_cache=False)
    assert cached.tokens == reference.tokens
    for got, want in zip(cached.logprobs, reference.logprobs, strict=True):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-4)
    # Non-trivial: the outputs are not a single repeated token per sample.
    assert sum(len(set(t)) > 2 for t in cached.tokens) >= 4


def test_cache_matches_reference_with_megatron_local_attention(megatron_world):
    _, trained = _trained("rope")
    cfg = _cfg("rope", backend="local")
    model = build_lm_part(cfg).eval()
    model.load_state_dict({k: v for k, v in trained.state_dict().items() if isinstance(v, torch.Tensor)}, strict=False)
    ids, lengths, emb = _prompts(cfg)
    assert _greedy(model, ids, lengths, emb).tokens == _greedy(trained, ids, lengths, emb).tokens
    assert _greedy(model, ids, lengths, emb).tokens == _greedy(model, ids, lengths, emb, use_cache=False).tokens


@pytest.mark.parametrize("position", ["rope", "learned_absolute"])
def test_batch_of_8_equals_each_sample_alone(megatron_world, position):
    cfg, model = _trained(position)
    ids, lengths, emb = _prompts(cfg, seed=2000)
    batched = _greedy(model, ids, lengths, emb)
    for b in range(ids.shape[0]):
        # Alone and without any padding columns.
        n = int(lengths[b])
        alone = _greedy(model, ids[b : b + 1, :n], lengths[b : b + 1], _sample_rows(cfg, emb, b))
        assert alone.tokens[0] == batched.tokens[b], f"sample {b}"
        torch.testing.assert_close(
            torch.tensor(alone.logprobs[0]), torch.tensor(batched.logprobs[b]), rtol=0, atol=1e-4
        )
    # The modality rows matter (so a row mix-up between samples would show): swapping two samples' rows moves
    # their log-probabilities far beyond the tolerance above.
    swapped = {m: rows.view(8, -1, HIDDEN)[[1, 0, 2, 3, 4, 5, 6, 7]].reshape(-1, HIDDEN) for m, rows in emb.items()}
    moved = _greedy(model, ids, lengths, swapped, max_new_tokens=1).logprobs[0][0] - batched.logprobs[0][0]
    assert abs(moved) > 1e-2


def test_eos_stops_a_sample_and_the_loop(megatron_world):
    cfg, model = _trained("rope")
    ids, lengths, emb = _prompts(cfg)
    reference = _greedy(model, ids, lengths, emb).tokens
    # EOS := sample 0's first new token at step >= 3, so it stops there and other samples stop wherever they emit it.
    step = next(i for i in range(3, 12) if reference[0][i] not in reference[0][:i])
    eos = reference[0][step]
    result = _greedy(model, ids, lengths, emb, eos_id=eos)
    for b, ref in enumerate(reference):
        expected = ref[: ref.index(eos)] if eos in ref else ref
        assert result.tokens[b] == expected
        assert result.finished[b] == (eos in ref)
    assert result.finished[0] and result.tokens[0] == reference[0][:step]
    # One sample alone stops after emitting EOS at `step`: 1 prefill + `step` decode passes, no more.
    alone = _greedy(model, ids[:1], lengths[:1], _sample_rows(cfg, emb, 0), eos_id=eos)
    assert alone.tokens == [reference[0][:step]] and alone.finished == [True]
    assert alone.num_forward_passes == step + 1 and alone.num_generated_tokens == step + 1


def test_sampling_reproducible_and_within_top_p(megatron_world):
    cfg, model = _trained("rope")
    ids, lengths, emb = _prompts(cfg)

    def sampled(seed, **kw):
        kw = {"temperature": 1.5, "top_p": 0.9, **kw}
        return _greedy(model, ids, lengths, emb, generator=torch.Generator().manual_seed(seed), **kw).tokens

    assert sampled(7) == sampled(7)
    assert sampled(7) != sampled(8)
    # A nucleus smaller than any token's mass holds only the argmax: sampling is greedy.
    assert sampled(3, top_p=1e-6) == _greedy(model, ids, lengths, emb).tokens

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = torch.softmax(logits / 0.7, dim=-1)
    allowed = nucleus_mask(probs, 0.8)
    assert ((probs * allowed).sum(-1) >= 0.8).all()
    # Minimal: dropping the least likely kept token falls below top_p.
    kept_min = torch.where(allowed, probs, torch.inf).min(-1).values
    assert ((probs * allowed).sum(-1) - kept_min < 0.8).all()
    gen = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_next(logits, temperature=0.7, top_p=0.8, generator=gen) for _ in range(200)], 1)
    assert allowed.gather(1, draws).all()
    assert all(len(set(row.tolist())) > 1 for row, n in zip(draws, allowed.sum(-1), strict=True) if n > 1)
    assert (allowed.sum(-1) > 1).any()


def test_shapes_counts_and_training_afterwards(megatron_world):
    cfg, model = _trained("rope")
    ids, lengths, emb = _prompts(cfg, batch=3)
    model.train()
    result = _greedy(
        model, ids, lengths, emb, max_new_tokens=5, temperature=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert model.training  # the training flag is restored
    assert [len(t) for t in result.tokens] == [5, 5, 5] and result.finished == [False] * 3
    assert result.num_prompt_tokens == int(lengths.sum())
    assert result.num_generated_tokens == 15 and result.num_forward_passes == 5
    assert result.tokens_per_s > 0
    # Generation left nothing behind that breaks a training step (Megatron caches RoPE tables per length).
    model.train()
    seq = int(lengths.max()) + 5  # the length generate asked RoPE for
    prompt = ids[:, :seq]
    loss = model.forward_lm(prompt, torch.arange(seq).expand(3, seq), emb, torch.roll(prompt, -1, 1)).mean()
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def test_placeholder_ids_are_never_generated(megatron_world):
    # An untrained LM with tied embeddings repeats its last input token; after an audio placeholder it would emit one.
    cfg = _cfg()
    model = build_lm_part(cfg).eval()
    prefix = _prefix(cfg)
    emb = _embeddings(cfg, 1, seed=0)
    text = _greedy(model, torch.tensor([prefix + [65]]), torch.tensor([len(prefix) + 1]), emb, max_new_tokens=3)
    assert text.tokens == [[65, 65, 65]]
    placeholder = _greedy(model, torch.tensor([prefix]), torch.tensor([len(prefix)]), emb, max_new_tokens=3)
    assert not set(placeholder.tokens[0]) & set(cfg.model.special_token_ids.values())


def test_argument_errors(megatron_world):
    cfg, model = _trained("rope")
    ids, lengths, emb = _prompts(cfg, batch=2)
    with pytest.raises(ValueError, match="'video': 8 placeholder tokens in the prompts but 4 embedding rows"):
        _greedy(model, ids, lengths, {**emb, "video": emb["video"][:4]})
    with pytest.raises(ValueError, match="prompt_lengths must be within"):
        _greedy(model, ids, torch.tensor([0, 3]), emb)
    with pytest.raises(ValueError, match="top_p"):
        _greedy(model, ids, lengths, emb, top_p=0.0)
    cfg_abs, model_abs = _trained("learned_absolute")
    with pytest.raises(ValueError, match="learned position embeddings"):
        _greedy(model_abs, ids, lengths, emb, max_new_tokens=cfg_abs.model.lm.seq_length)
