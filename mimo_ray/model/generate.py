"""Batched autoregressive generation for the MIMO language model, with a KV cache (nanochat ``engine.py``'s role).

The cache is Megatron's own: a ``StaticInferenceContext`` passed as ``inference_context`` to ``GPTModel``, so every
``SelfAttention`` stores its keys/values and the transformer itself is Megatron's, at any TP size. The modality
embeddings enter once, in the prefill (the prompt holds their placeholder tokens); each decode step embeds only the
new text token.

Padding convention. Callers pass prompts **right-padded** (sample ``b`` is ``input_ids[b, :prompt_lengths[b]]``, the
rest is ignored), which is what a collator produces. Internally every prompt is **left-padded** to the longest one,
so all samples' last prompt tokens share the last slot and each decode step writes one slot for the whole batch, as
Megatron's static cache requires. Exactness: padded keys are masked out of every query; learned absolute position
embeddings get per-sample positions (``slot - pad``); RoPE is applied by Megatron per slot, which shifts a sample's
queries and keys by the same ``pad`` so every query-key phase difference is the true relative position — the
attention is mathematically that of the unpadded sample (tokens agree with batch size 1; logits to rounding).

    result = generate(model, input_ids, prompt_lengths, model.encode(modality_inputs),
                      max_new_tokens=16, eos_id=258, pad_id=256)
    result.tokens[0], result.finished[0], result.tokens_per_s
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.inference.contexts import StaticInferenceContext

from mimo_ray.model.mimo import MimoRayModel


@dataclass
class GenerationResult:
    """Output of :func:`generate`.

    Attributes:
        tokens: new tokens per sample, cut at and excluding EOS.
        finished: whether each sample emitted EOS (else it hit ``max_new_tokens``).
        logprobs: per sample, the log-probability of each token in ``tokens`` under the model's own distribution
            (before placeholder suppression, temperature and top-p).
        num_prompt_tokens: sum of the prompt lengths.
        num_generated_tokens: tokens sampled for live samples, EOS included.
        num_forward_passes: model calls (prefill + decode steps, or full forwards without the cache).
        elapsed_s: wall time of the generation loop.
    """

    tokens: list[list[int]]
    finished: list[bool]
    logprobs: list[list[float]]
    num_prompt_tokens: int
    num_generated_tokens: int
    num_forward_passes: int
    elapsed_s: float

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time."""
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else float("inf")


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The top-p (nucleus) set: the most probable tokens whose mass reaches ``top_p``.

    Args:
        probs: ``[B, V]`` probabilities.
        top_p: mass in ``(0, 1]``; the most probable token is always kept.

    Returns:
        ``[B, V]`` bool, True for tokens in the set.
    """
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(dim=-1) - sorted_p
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row: greedy at ``temperature == 0``, else temperature + nucleus sampling.

    Args:
        logits: ``[B, V]``.
        temperature: 0 for argmax (first index on ties), else the softmax temperature.
        top_p: nucleus mass in ``(0, 1]``.
        generator: RNG for sampling; the draw happens on the generator's device (on the logits' device without
            one).

    Returns:
        ``[B]`` long token ids on ``logits.device``.
    """
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = probs * nucleus_mask(probs, top_p)
    device = generator.device if generator is not None else probs.device
    picked = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(-1)
    return picked.to(logits.device)


def attention_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Causal + key-padding mask for the last ``num_queries`` slots, Megatron convention (True = masked out).

    A padded query may see itself only, so no softmax row is empty: some attention kernels return NaN for an
    all-masked row, which would reach real queries through ``0 * NaN`` in the next layer's value product.

    Args:
        key_valid: ``[B, T]`` bool, True where a slot holds a real token.
        num_queries: queries are slots ``T - num_queries .. T - 1``.

    Returns:
        ``[B, 1, num_queries, T]`` bool.
    """
    total = key_valid.shape[1]
    q_slot = torch.arange(total - num_queries, total, device=key_valid.device).unsqueeze(1)
    k_slot = torch.arange(total, device=key_valid.device).unsqueeze(0)
    allowed = (k_slot <= q_slot) & (key_valid[:, None, :] | (k_slot == q_slot))
    return ~allowed.unsqueeze(1)


def _prompt_embeddings(
    model: MimoRayModel, ids: torch.Tensor, positions: torch.Tensor, modality_embeddings: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Text embeddings with the modality rows scattered into their placeholders, as in ``forward_lm``.

    Returns:
        ``[S, B, H]`` decoder input.
    """
    text = model.get_text_embeddings(ids, positions, model.special_token_ids)
    return model.align_embeddings_by_token_positions(
        {**modality_embeddings, "text": text}, ids, model.special_token_ids
    )


def _split_rows(ids: torch.Tensor, modality_embeddings: dict[str, torch.Tensor], special: dict[str, int]) -> list:
    """Per-sample chunks of each modality's batch-major rows: ``[{modality: [n_b, H]}]`` of length B."""
    chunks: list[dict[str, torch.Tensor]] = [{} for _ in range(ids.shape[0])]
    for name, rows in modality_embeddings.items():
        if name not in special:
            raise ValueError(f"no special token id is defined for modality {name!r}; known: {sorted(special)}")
        counts = (ids == special[name]).sum(dim=1).tolist()
        if sum(counts) != rows.shape[0]:
            raise ValueError(
                f"modality {name!r}: {sum(counts)} placeholder tokens in the prompts but {rows.shape[0]} embedding rows"
            )
        for b, part in enumerate(rows.split(counts)):
            chunks[b][name] = part
    return chunks


class _Batch:
    """Left-padded token state shared by both paths; rows can be dropped as samples finish.

    Args:
        ids: ``[B, S_p]`` left-padded prompts.
        pad: ``[B]`` left padding per row.
        total: slots reserved per row (``S_p + max_new_tokens``).
    """

    def __init__(self, ids: torch.Tensor, pad: torch.Tensor, total: int) -> None:
        slots = torch.arange(total, device=ids.device).unsqueeze(0)
        self.ids = ids
        self.key_valid = slots >= pad.unsqueeze(1)  # [B, total]
        self.positions = (slots - pad.unsqueeze(1)).clamp(min=0)  # [B, total]

    def keep(self, rows: torch.Tensor) -> None:
        self.ids, self.key_valid, self.positions = self.ids[rows], self.key_valid[rows], self.positions[rows]


def _concat_chunks(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    names = chunks[0].keys() if chunks else []
    return {name: torch.cat([c[name] for c in chunks]) for name in names}


class _CachedLM:
    """Prefill once into Megatron's static KV cache, then one slot per step."""

    def __init__(self, model: MimoRayModel, batch: _Batch, chunks: list, total: int) -> None:
        self.model, self.batch, self.chunks = model, batch, chunks
        self.ctx = StaticInferenceContext(max_batch_size=batch.ids.shape[0], max_sequence_length=total)

    def _run(self, decoder_input: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.model.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=mask,
            decoder_input=decoder_input,
            inference_context=self.ctx,
            runtime_gather_output=True,
        )
        self.ctx.increment_sequence_len_offset(decoder_input.shape[0])
        return logits[:, -1]

    def prefill(self) -> torch.Tensor:
        b = self.batch
        seq = b.ids.shape[1]
        mods = _concat_chunks(self.chunks)
        decoder_input = _prompt_embeddings(self.model, b.ids, b.positions[:, :seq], mods)
        self.ctx.enable_prefill_mode()
        logits = self._run(decoder_input, attention_mask(b.key_valid[:, :seq], seq))
        self.ctx.enable_decode_mode()
        self.chunks = []  # the modality rows live in the cache now
        return logits

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        b = self.batch
        slot = self.ctx.sequence_len_offset
        decoder_input = self.model.language_model.embedding(
            input_ids=tokens.unsqueeze(1), position_ids=b.positions[:, slot : slot + 1]
        )  # [1, B, H]
        return self._run(decoder_input, attention_mask(b.key_valid[:, : slot + 1], 1))

    def keep(self, rows: torch.Tensor) -> None:
        self.batch.keep(rows)
        memory = self.ctx.key_value_memory_dict
        for layer, (keys, values) in memory.items():
            memory[layer] = (keys[:, rows], values[:, rows])
        self.ctx.max_batch_size = int(rows.numel())


class _FullLM:
    """No-cache reference: the whole sequence (prompt with modality rows + generated text) every step."""

    def __init__(self, model: MimoRayModel, batch: _Batch, chunks: list, total: int) -> None:
        self.model, self.batch, self.chunks = model, batch, chunks

    def _run(self) -> torch.Tensor:
        b = self.batch
        seq = b.ids.shape[1]
        decoder_input = _prompt_embeddings(self.model, b.ids, b.positions[:, :seq], _concat_chunks(self.chunks))
        logits = self.model.language_model(
            input_ids=None,
            position_ids=None,
            attention_mask=attention_mask(b.key_valid[:, :seq], seq),
            decoder_input=decoder_input,
            runtime_gather_output=True,
        )
        return logits[:, -1]

    def prefill(self) -> torch.Tensor:
        return self._run()

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        self.batch.ids = torch.cat([self.batch.ids, tokens.unsqueeze(1)], dim=1)
        return self._run()

    def keep(self, rows: torch.Tensor) -> None:
        self.batch.keep(rows)
        self.chunks = [self.chunks[i] for i in rows.tolist()]


@contextlib.contextmanager
def _inference(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no autograd, restoring the training flag. ``no_grad`` rather than ``inference_mode``: Megatron
    keeps tensors made here for later calls (RoPE tables in an ``lru_cache``), and inference tensors are restricted
    outside inference mode (no in-place updates, not savable for backward).
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _left_pad(input_ids: torch.Tensor, prompt_lengths: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, S]`` → left-padded ``[B, max(prompt_lengths)]`` and the pad count per row ``[B]``."""
    batch = input_ids.shape[0]
    seq = int(prompt_lengths.max())
    pad = seq - prompt_lengths
    out = torch.full((batch, seq), pad_id, dtype=torch.long, device=input_ids.device)
    for b, length in enumerate(prompt_lengths.tolist()):
        out[b, seq - length :] = input_ids[b, :length]
    return out, pad


def _check_args(
    model: MimoRayModel,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    max_new_tokens: int,
    pad_id: int,
    temperature: float,
    top_p: float,
) -> None:
    vocab = model.language_model.vocab_size
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a [B, S] long tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    if prompt_lengths.shape != (input_ids.shape[0],):
        raise ValueError(f"prompt_lengths must be [B]={input_ids.shape[0]}, got {tuple(prompt_lengths.shape)}")
    if int(prompt_lengths.min()) < 1 or int(prompt_lengths.max()) > input_ids.shape[1]:
        raise ValueError(f"prompt_lengths must be within [1, {input_ids.shape[1]}], got {prompt_lengths.tolist()}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab})")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be within (0, 1]")
    last_position = int(prompt_lengths.max()) + max_new_tokens - 2
    limit = model.language_model.max_position_embeddings
    if model.language_model.position_embedding_type == "learned_absolute" and last_position >= limit:
        raise ValueError(
            f"longest prompt ({int(prompt_lengths.max())}) + max_new_tokens ({max_new_tokens}) needs position "
            f"{last_position}, beyond the {limit} learned position embeddings"
        )


def generate(
    model_lm: MimoRayModel,
    input_ids: torch.Tensor,
    prompt_lengths: torch.Tensor,
    modality_embeddings: dict[str, torch.Tensor],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt; finished samples leave the batch, the loop ends when all have.

    Every tensor-parallel rank of the LM must call this with the same arguments (and equally seeded generators).
    Placeholder token ids are never generated (a generated placeholder would have no embedding row).

    Args:
        model_lm: the fused model or the LM half (:func:`~mimo_ray.model.build_lm_part`); run in eval mode, its
            training flag is restored afterwards.
        input_ids: ``[B, S]`` long, right-padded: sample ``b`` is ``input_ids[b, :prompt_lengths[b]]``, holding
            its modality placeholder tokens.
        prompt_lengths: ``[B]`` long, each within ``[1, S]``.
        modality_embeddings: ``{modality: [N, H]}`` rows for the prompts' placeholders, batch-major (as
            :meth:`MimoRayModel.encode` returns them); ``{}`` for text-only prompts.
        max_new_tokens: new tokens per sample at most.
        eos_id: stops a sample (not included in its tokens); ``None`` never stops early (benchmarks).
        pad_id: fills the left padding; any in-vocabulary id (its slots are masked).
        temperature: 0 for greedy, else the sampling temperature.
        top_p: nucleus mass for sampling.
        generator: RNG for sampling (reproducible for a seed).
        use_cache: Megatron's static KV cache; ``False`` re-runs the full sequence each token (reference, slow).

    Returns:
        :class:`GenerationResult`.

    Raises:
        ValueError: malformed shapes or arguments, a placeholder/embedding-row count mismatch, or (learned absolute
            positions) a prompt plus ``max_new_tokens`` beyond the position table.
    """
    _check_args(model_lm, input_ids, prompt_lengths, max_new_tokens, pad_id, temperature, top_p)
    device = next(model_lm.language_model.parameters()).device
    input_ids, prompt_lengths = input_ids.to(device), prompt_lengths.to(device)
    ids, pad = _left_pad(input_ids, prompt_lengths, pad_id)
    chunks = _split_rows(ids, {k: v.to(device) for k, v in modality_embeddings.items()}, model_lm.special_token_ids)
    total = ids.shape[1] + max_new_tokens
    runner = (_CachedLM if use_cache else _FullLM)(model_lm, _Batch(ids, pad, total), chunks, total)
    suppressed = torch.tensor(sorted(set(model_lm.special_token_ids.values())), dtype=torch.long, device=device)
    vocab = getattr(model_lm, "text_vocab_size", None)  # rows past it are vocabulary padding, never generated

    num_samples = ids.shape[0]
    tokens: list[list[int]] = [[] for _ in range(num_samples)]
    logprobs: list[list[float]] = [[] for _ in range(num_samples)]
    finished = [False] * num_samples
    rows = list(range(num_samples))  # sample index of each live row
    num_forward = num_generated = 0
    start = time.perf_counter()
    with _inference(model_lm):
        logits = runner.prefill()
        num_forward += 1
        for step in range(max_new_tokens):
            logits = logits.float()
            if vocab is not None:
                logits = logits[:, :vocab]
            model_logprobs = torch.log_softmax(logits, dim=-1)
            logits[:, suppressed] = float("-inf")
            picked = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
            picked_logprobs = model_logprobs.gather(1, picked.unsqueeze(1)).squeeze(1).tolist()
            live = []
            for row, token in enumerate(picked.tolist()):
                sample = rows[row]
                num_generated += 1
                if eos_id is not None and token == eos_id:
                    finished[sample] = True
                else:
                    tokens[sample].append(token)
                    logprobs[sample].append(picked_logprobs[row])
                    live.append(row)
            if not live or step == max_new_tokens - 1:
                break
            if len(live) < len(rows):
                keep = torch.tensor(live, dtype=torch.long, device=device)
                runner.keep(keep)
                picked = picked[keep]
                rows = [rows[r] for r in live]
            logits = runner.decode(picked)
            num_forward += 1
    return GenerationResult(
        tokens=tokens,
        finished=finished,
        logprobs=logprobs,
        num_prompt_tokens=int(prompt_lengths.sum()),
        num_generated_tokens=num_generated,
        num_forward_passes=num_forward,
        elapsed_s=time.perf_counter() - start,
    )
