"""Output-task prompts: the output each row asks for, and its prompt forced to end in that output's K generation
tokens (what :func:`mimo_ray.model.output_generate.decode_generation` decodes).
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_ray.data.output_tasks import GEN_TAGS, OutputChatTokenizer


def requested_output(row: dict[str, Any], outputs: dict[str, Any]) -> str:
    """The output a row asks for: the generation tag of its reference answer, else its ``image_out``/``audio_out``.

    Raises:
        ValueError: the row asks for no enabled output, naming the row.
    """
    answer = row["conversations"][-1].get("value", "") if len(row["conversations"]) % 2 == 0 else ""
    for tag, name in GEN_TAGS.items():
        if tag in answer and name in outputs:
            return name
    for name in outputs:
        if row.get(name):
            return name
    raise ValueError(f"row {row.get('id')!r} asks for none of the enabled outputs {sorted(outputs)}")


def build_output_prompts(
    tok: OutputChatTokenizer, outputs: dict[str, Any], rows: list[dict[str, Any]]
) -> tuple[list[str], torch.Tensor]:
    """Each row's prompt followed by the K generation tokens of its requested output, right-padded.

    Returns:
        ``(output name per row, input_ids [B, S])``; causal attention keeps the right padding out of every prompt.
    """
    names = [requested_output(r, outputs) for r in rows]
    seqs = [
        list(tok.encode_prompt(r["conversations"]).ids) + [outputs[n].token_id] * outputs[n].num_tokens
        for r, n in zip(rows, names, strict=True)
    ]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), tok.pad_id, dtype=torch.long)
    for b, seq in enumerate(seqs):
        ids[b, : len(seq)] = torch.tensor(seq)
    return names, ids
