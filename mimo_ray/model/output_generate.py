"""Generate images / audio for output-task prompts: the prompt is forced to continue with the K generation tokens of
the requested output, one LM forward gives their final-norm hidden states, the decoder turns them into an RGB image
or a log-mel (→ Griffin-Lim waveform), written as PNG / WAV and referenced from the returned JSONL rows.

    rows = read_output_rows("data/syn/val_out.jsonl")
    preds = generate_outputs(model, cfg, rows, "run/outputs")   # [{"id", "output", "image_out_path"|...}]
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
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


@torch.no_grad()
def decode_generation(model: Any, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """One LM forward over prompts ending in generation tokens → each output's decoded media, batch-major.

    Args:
        model: a :class:`~mimo_ray.model.MimoRayModel` with output decoders (fused, or an LM rank's part).
        input_ids: ``[B, S]`` from :func:`build_output_prompts`.

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


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
MAX_STEM = 60  # characters of the readable part of a file name


def output_file_name(row_id: str, suffix: str) -> str:
    """A file name for a row's output that cannot collide with another id's or leave its folder.

    The id's ASCII letters, digits, ``-`` and ``_`` are kept (other runs of characters become one ``_``, at most
    :data:`MAX_STEM` characters), followed by the first 12 hex digits of the SHA-256 of the full id: ``a.1`` →
    ``a_1-<hash>.png``; ``../evil`` → ``_evil-<hash>.png``. No separator, dot or leading dot survives.
    """
    ascii_id = unicodedata.normalize("NFKD", row_id).encode("ascii", "ignore").decode()
    stem = _UNSAFE.sub("_", ascii_id)[:MAX_STEM] or "row"
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{stem}-{digest}{suffix}"


def write_output(name: str, value: np.ndarray, folder: Path, row_id: str, spec: Any) -> Path:
    """Write one decoded output under ``folder``: image ``[3, S, S]`` in [0, 1] → PNG; waveform ``[L]`` → WAV.

    Returns:
        The file, named by :func:`output_file_name`.

    Raises:
        ValueError: the name would resolve outside ``folder`` (an invariant; names hold no separators).
    """
    suffix = ".png" if name == "image_out" else ".wav"
    path = Path(folder) / output_file_name(row_id, suffix)
    if path.resolve().parent != Path(folder).resolve():
        raise ValueError(f"output file for row {row_id!r} would be written outside {str(folder)!r}: {path}")
    if name == "image_out":
        write_png(path, np.round(np.clip(value, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))
    else:
        write_wav(path, np.asarray(value, dtype=np.float32), spec.sample_rate)
    return path


def split_decoded(names: list[str], decoded: dict[str, Any]) -> list[Any]:
    """Per-row values from :func:`decode_generation`'s batch-major groups, in row order."""
    taken = dict.fromkeys(decoded, 0)
    values = []
    for name in names:
        values.append(decoded[name][taken[name]])
        taken[name] += 1
    return values


def generate_outputs(
    model: Any, cfg: Any, rows: list[dict[str, Any]], out_dir: str | os.PathLike, batch_size: int = 8
) -> list[dict[str, Any]]:
    """Write one PNG or WAV per row, in this process.

    Args:
        model: a :class:`~mimo_ray.model.MimoRayModel` with output decoders (fused, or the LM part: no input media).
        cfg: its config.
        rows: manifest rows (``conversations`` + optionally ``image_out``/``audio_out``).
        out_dir: folder for the files (created).
        batch_size: prompts per forward.

    Returns:
        Per row ``{"id", "output": name, "<name>_path": file, "file": name relative to out_dir}`` in input order.
    """
    outputs = cfg.model.outputs.active()
    tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), outputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    preds = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        names, ids = build_output_prompts(tok, outputs, chunk)
        decoded = decode_generation(model, ids)
        for row, name, value in zip(chunk, names, split_decoded(names, decoded), strict=True):
            rid = str(row.get("id", start))
            path = write_output(name, value.cpu().numpy(), out_dir, rid, outputs[name])
            preds.append({"id": rid, "output": name, f"{name}_path": str(path), "file": path.name})
    return preds
