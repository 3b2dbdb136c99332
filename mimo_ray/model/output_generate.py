"""Decode output-task generations: prompts ending in the K generation tokens of the requested output go through one LM
forward whose final-norm hidden states at those tokens the output decoders turn into an RGB image or a log-mel
(→ Griffin-Lim waveform). Prompts: :mod:`mimo_ray.data.output_prompts`; files: :mod:`mimo_ray.media.output_files`.

    names, ids = build_output_prompts(tok, outputs, rows)
    values = split_decoded(names, decode_generation(model, ids))   # one array per row, in row order
"""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def decode_generation(model: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One LM forward over prompts ending in generation tokens → each output's decoded media, batch-major.

    Args:
        model: a :class:`~mimo_ray.model.MimoRayModel` with output decoders (fused, or an LM rank's part).
        input_ids: ``[B, S]`` from :func:`~mimo_ray.data.output_prompts.build_output_prompts`.

    Returns:
        ``{"image_out": [n, 3, S, S] in [0, 1], "audio_out": [n, samples] waveform}`` for the outputs present, in
        the order their samples appear in the batch.
    """
    model.eval()
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    _, rows_by_output = model.forward_lm_rows(input_ids, positions, {})
    decoded = {n: model.output_decoders.decode(n, r) for n, r in rows_by_output.items()}
    if "image_out" in decoded:
        decoded["image_out"] = decoded["image_out"].float().clamp(0, 1)
    if "audio_out" in decoded:
        decoded["audio_out"] = model.output_decoders.waveform(decoded["audio_out"]).float()
    return decoded


def split_decoded(names: list[str], decoded: dict[str, Any]) -> list[Any]:
    """Per-row values from :func:`decode_generation`'s batch-major groups, in row order."""
    taken = dict.fromkeys(decoded, 0)
    values = []
    for name in names:
        values.append(decoded[name][taken[name]])
        taken[name] += 1
    return values
