"""Generate images / audio for output-task prompts: the prompt is forced to continue with the K generation tokens of
the requested output, one LM forward gives their final-norm hidden states, the decoder turns them into an RGB image
or a log-mel (→ Griffin-Lim waveform), written as PNG / WAV and referenced from the returned JSONL rows.

    rows = read_output_rows("data/syn/val_out.jsonl")
    preds = generate_outputs(model, cfg, rows, "run/outputs")   # [{"id", "output", "image_out_path"|...}]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimo_ray.data.output_tasks import GEN_TAGS, OutputChatTokenizer, write_png, write_wav
from mimo_ray.data.tokenizer import ChatTokenizer


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


@torch.no_grad()
def generate_outputs(
    model: Any, cfg: Any, rows: list[dict[str, Any]], out_dir: str | os.PathLike, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Write one PNG or WAV per row.

    Args:
        model: a :class:`~mimo_ray.model.MimoRayModel` with output decoders (fused, or the LM part: no input media).
        cfg: its config.
        rows: manifest rows (``conversations`` + optionally ``image_out``/``audio_out``).
        out_dir: folder for the files (created).
        batch_size: prompts per forward.

    Returns:
        Per row ``{"id", "output": name, "<name>_path": file}`` in input order.
    """
    outputs = cfg.model.outputs.active()
    tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), outputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    preds = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        names = [requested_output(r, outputs) for r in chunk]
        seqs = [
            list(tok.encode_prompt(r["conversations"]).ids) + [outputs[n].token_id] * outputs[n].num_tokens
            for r, n in zip(chunk, names, strict=True)
        ]
        seq = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), seq), tok.pad_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)  # right padding: causal attention keeps it out of every prompt
        positions = torch.arange(seq).expand(len(seqs), seq)
        _, rows_by_output = model.forward_lm_rows(ids, positions, {})
        decoded = {n: model.output_decoders.decode(n, r) for n, r in rows_by_output.items()}
        if "audio_out" in decoded:
            decoded["audio_out"] = model.output_decoders.waveform(decoded["audio_out"])
        taken = dict.fromkeys(decoded, 0)
        for row, name in zip(chunk, names, strict=True):
            value = decoded[name][taken[name]].float().cpu()
            taken[name] += 1
            rid = str(row.get("id", start))
            if name == "image_out":
                path = out_dir / f"{rid}.png"
                write_png(path, (value.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            else:
                path = out_dir / f"{rid}.wav"
                write_wav(path, value.numpy().astype(np.float32), outputs[name].sample_rate)
            preds.append({"id": rid, "output": name, f"{name}_path": str(path)})
    return preds
