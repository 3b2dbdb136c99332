"""Placeholder-token alignment (DESIGN.md C2): scatter each modality's embedding rows into the positions of its
special token, text embeddings everywhere else. Pure tensor code; raises on any count mismatch.
"""

from __future__ import annotations

import torch


def align_embeddings(
    modality_embeddings: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    special_token_ids: dict[str, int],
) -> torch.Tensor:
    """Combine text and modality embeddings by token position.

    Args:
        modality_embeddings: ``{"text": [N_text, H], modality: [N_mod, H], ...}``; rows are batch-major (all of
            sample 0, then sample 1, ...), in sequence order within a sample.
        input_ids: ``[B, S]`` with one special token id per modality placeholder.
        special_token_ids: ``{modality: token id}`` for every modality the model knows.

    Returns:
        ``[S, B, H]`` decoder input.

    Raises:
        ValueError: a modality's placeholder count differs from its embedding rows (naming the modality and both
            counts), placeholders appear for a modality with no embeddings, or an embedding has no token id.
    """
    for name in modality_embeddings:
        if name != "text" and name not in special_token_ids:
            raise ValueError(f"no special token id is defined for modality {name!r}")
    masks: dict[str, torch.Tensor] = {}
    text_mask = torch.ones_like(input_ids, dtype=torch.bool)
    for name, token_id in special_token_ids.items():
        mask = input_ids == token_id
        text_mask &= ~mask
        count = int(mask.sum())
        if name not in modality_embeddings:
            if count:
                samples = [b for b, c in enumerate(mask.sum(dim=1).tolist()) if c]
                raise ValueError(
                    f"input_ids contain {count} {name!r} placeholder tokens (id {token_id}) but no {name!r} "
                    f"embeddings were given (samples {samples} hold them; the batch has no "
                    f"modality_inputs[{name!r}])"
                )
            continue
        masks[name] = mask
    if "text" in modality_embeddings:
        masks["text"] = text_mask
    reference = next(iter(modality_embeddings.values()))
    batch, seq = input_ids.shape
    combined = torch.zeros(batch, seq, reference.shape[-1], dtype=reference.dtype, device=reference.device)
    for name, mask in masks.items():
        rows = modality_embeddings[name]
        count = int(mask.sum())
        if count != rows.shape[0]:
            raise ValueError(count_mismatch(name, mask.sum(dim=1).tolist(), rows.shape[0]))
        combined = combined.masked_scatter(mask.unsqueeze(-1), rows.to(combined.dtype))
    return combined.transpose(0, 1).contiguous()


def count_mismatch(name: str, counts: list[int], rows: int) -> str:
    """The error for a modality whose embedding rows differ from its placeholder tokens, naming the samples at fault.

    Args:
        name: the modality.
        counts: placeholder tokens of ``name`` in each sample.
        rows: embedding rows the encoder (+ projection) produced for the whole batch.

    Returns:
        ``modality 'x': N placeholder tokens in input_ids but M embedding rows; ...`` with, when the rows divide
        evenly over the samples that hold placeholders, the samples whose count differs from that share.
    """
    total = sum(counts)
    text = f"modality {name!r}: {total} placeholder tokens in input_ids but {rows} embedding rows"
    holders = [b for b, c in enumerate(counts) if c]
    per = rows // len(holders) if holders and rows % len(holders) == 0 else None
    if per is not None:
        bad = [f"sample {b} has {counts[b]}" for b in holders if counts[b] != per]
        if bad:
            text += f" ({per} rows per sample from the encoder; {', '.join(bad)} placeholders)"
    return text + f"; placeholders per sample {counts}"
