"""Correctly shaped random MIMO batches (C1), for the fused job before real data, benchmarks and tests.

A sample is ``[BOS] <video>*Nv <audio>*Na text...`` padded to ``seq_length``; labels are the next token, with
``loss_mask`` on the text after the placeholders. Media are standard-normal tensors of the encoder input shape.
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.model.spec import INPUT_KWARG, encoder_name, input_shape, tokens_per_sample

Batch = dict[str, Any]
BOS_ID = 257
PAD_ID = 256


def random_batch(cfg: Config, batch_size: int, seed: int, text_len: int | None = None) -> Batch:
    """One random batch.

    Args:
        cfg: config (model shapes, modalities, special tokens).
        batch_size: B.
        seed: generator seed; the same seed gives the same batch.
        text_len: text tokens per sample after the placeholders (default: fill the sequence, varying per sample).

    Returns:
        ``{"input_ids", "position_ids", "labels", "loss_mask"}`` of shape ``[B, S]`` and
        ``modality_inputs = {modality: {encoder_name: {kwarg: [B, ...]}}}``.
    """
    gen = torch.Generator().manual_seed(seed)
    model = cfg.model
    seq = model.lm.seq_length
    text_vocab = min(256, model.lm.vocab_size)
    input_ids = torch.full((batch_size, seq), PAD_ID % model.lm.vocab_size, dtype=torch.long)
    loss_mask = torch.zeros(batch_size, seq, dtype=torch.float32)
    prefix = [BOS_ID % model.lm.vocab_size]
    for mod in model.modalities:
        prefix += [model.special_token_ids[mod]] * tokens_per_sample(cfg, mod)
    if len(prefix) >= seq:
        raise ValueError(f"model.lm.seq_length={seq} leaves no room for text after {len(prefix)} placeholder tokens")
    # Text never draws a modality's placeholder id (small imported vocabularies put them below 256).
    specials = torch.tensor(sorted({model.special_token_ids[m] for m in model.modalities}), dtype=torch.long)
    filler = next(i for i in range(text_vocab + len(specials) + 1) if i not in specials.tolist())
    for b in range(batch_size):
        room = seq - len(prefix)
        n_text = text_len if text_len is not None else int(torch.randint(room // 2, room + 1, (1,), generator=gen))
        n_text = min(n_text, room)
        text = torch.randint(0, text_vocab, (n_text,), generator=gen)
        text[torch.isin(text, specials)] = filler
        row = torch.tensor(prefix + text.tolist(), dtype=torch.long)
        input_ids[b, : row.numel()] = row
        # Predict every text token (targets at positions len(prefix)-1 .. end-2).
        loss_mask[b, len(prefix) - 1 : row.numel() - 1] = 1.0
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    labels[:, -1] = PAD_ID % model.lm.vocab_size
    position_ids = torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(batch_size, seq).contiguous()
    modality_inputs = {
        mod: {
            encoder_name(model, mod): {
                INPUT_KWARG[mod]: torch.randn(batch_size, *input_shape(cfg, mod), generator=gen)
            }
        }
        for mod in model.modalities
    }
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "labels": labels,
        "loss_mask": loss_mask,
        "modality_inputs": modality_inputs,
    }


def with_output_tasks(cfg: Config, batch: Batch, seed: int) -> Batch:
    """Turn some samples of a :func:`random_batch` into output tasks (tests, benchmarks).

    Sample ``b`` gets the K generation tokens of the ``b % (n + 1)``-th enabled output (``n`` outputs; the last
    residue keeps a text-only sample) written right after its placeholders, with random targets (images
    ``[N, 3, S, S]`` uint8, waveforms ``[N, L]``) in ``batch["output_targets"]``, batch-major.

    Raises:
        ValueError: no output is enabled in ``model.outputs``.
    """
    outputs = cfg.model.outputs.active()
    if not outputs:
        raise ValueError("model.outputs enables no output")
    gen = torch.Generator().manual_seed(seed)
    input_ids = batch["input_ids"].clone()
    start = 1 + sum(tokens_per_sample(cfg, m) for m in cfg.model.modalities)
    names = list(outputs)
    targets: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for b in range(input_ids.shape[0]):
        choice = b % (len(names) + 1)
        if choice == len(names):
            continue
        name, spec = names[choice], outputs[names[choice]]
        input_ids[b, start : start + spec.num_tokens] = spec.token_id
        if name == "image_out":
            size = spec.image_size
            targets[name].append(torch.randint(0, 256, (3, size, size), generator=gen, dtype=torch.uint8))
        else:
            targets[name].append(0.5 * torch.randn(spec.num_samples, generator=gen))
    labels = torch.roll(input_ids, shifts=-1, dims=1)
    labels[:, -1] = PAD_ID % cfg.model.lm.vocab_size
    out = {**batch, "input_ids": input_ids, "labels": labels}
    out["output_targets"] = {n: torch.stack(t) for n, t in targets.items() if t}
    return out
