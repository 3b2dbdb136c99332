"""Output-task data: manifest rows whose answer is a generation tag (``<image_gen>`` / ``<audio_gen>``) and whose
``image_out`` / ``audio_out`` field names the target PNG / WAV → C1 micro-batches with ``output_targets``
(PNG/WAV files: :mod:`mimo_ray.media.files`).

    rows = read_output_rows("data/syn/train_out.jsonl")
    batches = OutputTaskBatches(cfg, rows, micro_batch_size=4, seed=0)   # iterable of C1 batches
    batch["output_targets"]   # {"image_out": uint8 [N, 3, S, S], "audio_out": float32 [N, L]}, batch-major

Each answer tag becomes exactly ``model.outputs.<name>.num_tokens`` generation tokens (C2's rule for outputs), so
the LM's hidden states at those positions condition the decoder. The targets are small, so they are read in the
driver (:class:`~mimo_ray.data.output_source.OutputTaskSource`), not by the Ray Data media pipeline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimo_ray.data.audio import load_audio
from mimo_ray.data.tokenizer import ChatTokenizer
from mimo_ray.media.files import read_png

#: Answer tag → output name.
GEN_TAGS: dict[str, str] = {"<image_gen>": "image_out", "<audio_gen>": "audio_out"}
OUTPUT_KEYS = tuple(GEN_TAGS.values())


def read_output_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSONL rows with target paths made absolute (relative to the manifest's folder).

    Raises:
        ValueError: a malformed line, naming the file and line.
    """
    base = Path(path).parent
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err})") from None
            for key in OUTPUT_KEYS:
                if row.get(key):
                    row[key] = str(base / row[key])
            rows.append(row)
    return rows


class OutputChatTokenizer(ChatTokenizer):
    """A :class:`ChatTokenizer` whose answers may hold generation tags, each expanded to K generation tokens.

    Args:
        base: the chat tokenizer (``ChatTokenizer.from_config(cfg)``).
        outputs: ``cfg.model.outputs.active()``.
    """

    def __init__(self, base: ChatTokenizer, outputs: dict[str, Any]):
        super().__init__(base.text, base.placeholders, base.seq_length, base.chat_template)
        self.gen = {tag: (outputs[name].token_id, outputs[name].num_tokens) for tag, name in GEN_TAGS.items()
                    if name in outputs}

    def _encode_answer(self, text: str) -> list[int]:
        ids: list[int] = []
        rest = text
        while True:
            hits = [(rest.find(tag), tag) for tag in self.gen if tag in rest]
            if not hits:
                return ids + super()._encode_answer(rest)
            pos, tag = min(hits)
            token, count = self.gen[tag]
            ids += super()._encode_answer(rest[:pos]) + [token] * count
            rest = rest[pos + len(tag) :]


def load_target(name: str, path: str, spec: Any) -> torch.Tensor:
    """One target: image → uint8 ``[3, S, S]``; audio → float32 ``[L]`` mono at the decoder's rate, cropped/padded.

    Raises:
        ValueError: an image of the wrong size, naming the file and both sizes.
    """
    if name == "image_out":
        image = read_png(path)
        if image.shape[:2] != (spec.image_size, spec.image_size):
            raise ValueError(
                f"{path}: image is {image.shape[1]}x{image.shape[0]} but model.outputs.image_out.image_size="
                f"{spec.image_size}"
            )
        return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    wave = load_audio(path, target_sr=spec.sample_rate)
    out = np.zeros(spec.num_samples, dtype=np.float32)
    out[: min(len(wave), spec.num_samples)] = wave[: spec.num_samples]
    return torch.from_numpy(out)


def collate_output_rows(cfg: Any, tok: OutputChatTokenizer, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows → one C1 micro-batch (no input media) with ``output_targets`` in sample order."""
    outputs = cfg.model.outputs.active()
    ids, labels, masks = [], [], []
    targets: dict[str, list[torch.Tensor]] = {n: [] for n in outputs}
    for row in rows:
        enc = tok.encode(row["conversations"])
        i, lab, m = tok.pad(enc)
        ids.append(i), labels.append(lab), masks.append(m)
        for name, spec in outputs.items():
            if spec.token_id in enc.ids:
                if not row.get(name):
                    raise ValueError(f"row {row.get('id')!r}: the answer asks for {name} but the row has no {name!r}")
                targets[name].append(load_target(name, row[name], spec))
    input_ids = torch.from_numpy(np.stack(ids))
    seq = input_ids.shape[1]
    return {
        "input_ids": input_ids,
        "position_ids": torch.arange(seq).expand(len(rows), seq).contiguous(),
        "labels": torch.from_numpy(np.stack(labels)),
        "loss_mask": torch.from_numpy(np.stack(masks)),
        "modality_inputs": {},
        "output_targets": {n: torch.stack(t) for n, t in targets.items() if t},
    }


class OutputTaskBatches:
    """Endless, reshuffled-per-epoch micro-batches of output-task rows (targets decoded once and cached).

    Args:
        cfg: the config (tokenizer, ``model.outputs``, sequence length).
        rows: from :func:`read_output_rows`.
        micro_batch_size: samples per batch.
        seed: shuffle seed.
        shuffle: reshuffle every epoch.
    """

    def __init__(self, cfg: Any, rows: list[dict[str, Any]], micro_batch_size: int, seed: int = 0,
                 shuffle: bool = True):
        if len(rows) < micro_batch_size:
            raise ValueError(f"{len(rows)} output-task rows cannot fill a micro-batch of {micro_batch_size}")
        self.cfg, self.rows, self.micro, self.shuffle = cfg, rows, micro_batch_size, shuffle
        self.tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), cfg.model.outputs.active())
        self.gen = np.random.default_rng(seed)
        self._cache = [collate_output_rows(cfg, self.tok, [r]) for r in rows]

    def __iter__(self) -> Any:
        while True:
            order = self.gen.permutation(len(self.rows)) if self.shuffle else np.arange(len(self.rows))
            for start in range(0, len(order) - self.micro + 1, self.micro):
                yield merge_batches([self._cache[i] for i in order[start : start + self.micro]])


def merge_batches(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """Concatenate single-sample output-task batches along the batch (targets stay batch-major)."""
    out = {k: torch.cat([b[k] for b in batches]) for k in ("input_ids", "position_ids", "labels", "loss_mask")}
    names = sorted({n for b in batches for n in b["output_targets"]})
    out["modality_inputs"] = {}
    out["output_targets"] = {
        n: torch.cat([b["output_targets"][n] for b in batches if n in b["output_targets"]]) for n in names
    }
    return out
