"""Output-task manifests as a training / evaluation data source (the driver's ``next_step`` / ``rank_streams``).

    if is_output_manifest("data/syn/train_out.jsonl"):
        src = OutputTaskSource(cfg, "train", start_sample=step * cfg.data.global_batch_size)
        micro = src.next_step()          # fused runtime: the micro-batches of one optimizer step, global order
        streams = src.rank_streams(2)    # disaggregated: rank r gets global micro-batches r, r + 2, …

Rows are ``{id, conversations, image_out? | audio_out?}`` (see ``datasets/README.md``): the gpt answer holds a
generation tag (``<image_gen>`` / ``<audio_gen>``) and the named file is the decoder's target. Targets are small
(a 64x64 PNG, half a second of audio), so they are read once, in the driver, and every rank stream carries the
encoded samples; a row whose text or target cannot be used is quarantined with its stage and reason.

**Order.** Sample ``g`` of the endless train stream is row ``permutation(seed, g // N)[g % N]`` of the ``N`` good
rows, and micro-batch ``m`` is samples ``m*B … m*B+B-1``, so a resumed run (``start_sample``) and every runtime see
the same batches. ``val`` is the rows in file order, once, the last micro-batch possibly short.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mimo_ray.data.cursor import MicroBatchCursor
from mimo_ray.data.output_tasks import (
    GEN_TAGS,
    OUTPUT_KEYS,
    OutputChatTokenizer,
    collate_output_rows,
    merge_batches,
    read_output_rows,
)
from mimo_ray.data.quarantine import BadRow, DataQualityError, QuarantineLog, bad_ids, quarantine_path
from mimo_ray.data.tokenizer import ChatTokenizer, TokenizeError

log = logging.getLogger("mimo_ray")


def is_output_manifest(path: str | Path) -> bool:
    """Whether a JSONL manifest holds output tasks: its first row names ``image_out``/``audio_out`` or its answer
    holds a generation tag. Parquet manifests (understanding tasks only) are never output manifests.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".json") or not path.is_file():
        return False
    with path.open("rb") as f:
        if not f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"{"):
            return False  # a JSON array or Parquet file: understanding tasks (never read a one-line array whole)
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                return False  # the manifest reader reports it with its line number
            if not isinstance(row, dict):
                return False
            if any(k in row for k in OUTPUT_KEYS):
                return True
            turns = row.get("conversations") or []
            return any(tag in str(t.get("value", "")) for t in turns if isinstance(t, dict) for tag in GEN_TAGS)
    return False


def check_outputs_enabled(cfg: Any, path: str, flag: str) -> None:
    """Fail with the flag to set when a manifest of output tasks meets a model without output decoders."""
    if not cfg.model.outputs.active():
        raise ValueError(
            f"{flag} {path!r} holds output tasks (image_out / audio_out rows) but no output decoder is enabled; "
            "set model.outputs.image_out.enabled=true and/or model.outputs.audio_out.enabled=true"
        )


def _target_path(row: dict[str, Any]) -> str:
    return next((str(row[k]) for k in OUTPUT_KEYS if row.get(k)), "")


def load_output_samples(
    cfg: Any, path: str, split: str, qlog: QuarantineLog
) -> tuple[list[str], list[dict[str, Any]], int]:
    """Encode every row of an output-task manifest once: ``(ids, one-sample C1 batches, number of rows)``.

    Rows with a duplicate or missing id, an unusable conversation, a missing/wrong-size target, or an answer that
    asks for no enabled output go to ``qlog`` (stage ``manifest``/``tags``/``text``/``open``/``decode``).
    """
    rows = read_output_rows(path)
    outputs = cfg.model.outputs.active()
    tok = OutputChatTokenizer(ChatTokenizer.from_config(cfg), outputs)
    token_ids = {spec.token_id for spec in outputs.values()}
    ids, samples, seen = [], [], set()
    for index, row in enumerate(rows):
        rid = str(row.get("id", ""))

        def bad(stage: str, error: str, rid: str = rid, index: int = index, row: dict = row) -> None:
            qlog.add(BadRow(rid or f"<row {index}>", _target_path(row), stage, error, path, index, split))

        if not rid or rid in seen:  # keyed by row, not id: the first row of a duplicated id stays good
            bad("manifest", f"row {index}: {'duplicate' if rid else 'missing'} id {rid!r}", rid="")
            continue
        seen.add(rid)
        try:
            enc = tok.encode(row.get("conversations"))
        except TokenizeError as err:
            bad(err.stage, str(err))
            continue
        if not token_ids & set(enc.ids.tolist() if hasattr(enc.ids, "tolist") else enc.ids):
            bad("tags", f"the answer asks for none of the enabled outputs {sorted(outputs)} ({sorted(GEN_TAGS)})")
            continue
        target = _target_path(row)
        if target and not Path(target).is_file():
            bad("open", f"{target}: no such file")
            continue
        try:
            samples.append(collate_output_rows(cfg, tok, [row]))
        except (ValueError, OSError, RuntimeError) as err:  # wrong size, undecodable target, missing field
            bad("decode", str(err).splitlines()[0])
            continue
        ids.append(rid)
    return ids, samples, len(rows)


class OutputTaskStream:
    """Picklable iterator of micro-batches of output-task samples for one rank (handed to an encoder actor).

    Args:
        ids: sample ids, aligned with ``samples``.
        samples: one-sample C1 batches (:func:`~mimo_ray.data.output_tasks.collate_output_rows`).
        micro_batch_size: samples per micro-batch.
        seed: the epoch permutations' seed (``data.seed``).
        shuffle: permute per epoch (train) or keep file order.
        rank, num_ranks: this stream gets global micro-batches ``start + rank + k * num_ranks``.
        start: first global micro-batch index (resume point).
    """

    def __init__(self, ids: list[str], samples: list[dict[str, Any]], micro_batch_size: int, seed: int,
                 shuffle: bool, rank: int = 0, num_ranks: int = 1, start: int = 0) -> None:  # fmt: skip
        self.ids, self.samples = ids, samples
        self.micro, self.seed, self.shuffle = micro_batch_size, seed, shuffle
        self.num_ranks = num_ranks
        self.next_index = start + rank
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, sample: int) -> int:
        epoch, offset = divmod(sample, len(self.samples))
        if not self.shuffle:
            return offset
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, epoch, 0x0C7]).permutation(len(self.samples))}
        return int(self._orders[epoch][offset])

    def micro_batch(self, index: int) -> dict[str, Any]:
        """Global micro-batch ``index``: ``{input_ids [B, S], labels, loss_mask, position_ids, modality_inputs: {},
        output_targets: {name: [n, ...]}, ids}``.
        """
        rows = [self._row(g) for g in range(index * self.micro, (index + 1) * self.micro)]
        batch = merge_batches([self.samples[r] for r in rows])
        batch["ids"] = [self.ids[r] for r in rows]
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.micro_batch(self.next_index)
        self.next_index += self.num_ranks
        return batch


class OutputTaskSource(MicroBatchCursor):
    """Driver-side data source over an output-task manifest (same interface as the manifest pipeline's source).

    Args:
        cfg: config (``model.outputs`` enabled, ``data.*`` batch sizes, ``train.output_dir`` for the quarantine).
        split: ``train`` (endless, reshuffled per epoch) or ``val`` (file order, once).
        start_sample: samples already consumed (resume).

    Raises:
        ValueError: no output decoder enabled, or no usable row at all.
        DataQualityError: more than ``data.max_bad_fraction`` of the rows are bad.
    """

    def __init__(self, cfg: Any, split: str, start_sample: int = 0) -> None:
        flag, path = ("--val-path", cfg.data.val_path) if split == "val" else ("--data-path", cfg.data.data_path)
        check_outputs_enabled(cfg, path, flag)
        self.cfg, self.split, self.finite = cfg, split, split != "train"
        self.path = str(Path(path).resolve())
        self.quarantine_file = quarantine_path(cfg.train.output_dir)
        qlog = QuarantineLog(self.quarantine_file, self.path)
        ids, samples, num_rows = load_output_samples(cfg, self.path, split, qlog)
        self.quarantined = len(bad_ids(self.quarantine_file, self.path) | {b.id for b in qlog.new})
        if num_rows and (num_rows - len(ids)) > cfg.data.max_bad_fraction * num_rows:
            raise DataQualityError(
                f"{path}: {num_rows - len(ids)} of {num_rows} output-task rows are bad (> data.max_bad_fraction="
                f"{cfg.data.max_bad_fraction}); see {self.quarantine_file}"
            )
        if not ids:
            raise ValueError(f"{flag} {path!r} has no usable output-task row")
        micro = cfg.data.micro_batch_size
        if not self.finite and len(ids) < micro:
            raise ValueError(f"{flag} {path!r}: {len(ids)} usable rows cannot fill data.micro_batch_size={micro}")
        self._ids, self._samples = ids, samples
        self.next_micro = start_sample // micro
        self._val_next = 0

    def _stream(self, rank: int = 0, num_ranks: int = 1) -> OutputTaskStream:
        shuffle = not self.finite and self.cfg.data.shuffle
        data = self.cfg.data
        return OutputTaskStream(self._ids, self._samples, data.micro_batch_size, data.seed, shuffle, rank, num_ranks,
                                self.next_micro)  # fmt: skip

    def next_step(self) -> list[dict[str, Any]]:
        """The micro-batches of the next optimizer step in global order (``val``: ``[]`` once every row is out)."""
        if not self.finite:
            stream = self._stream()
            self.next_micro += self.micro_per_step
            return [next(stream) for _ in range(self.micro_per_step)]
        out = []
        micro = self.cfg.data.micro_batch_size
        while len(out) < self.micro_per_step and self._val_next < len(self._ids):
            rows = range(self._val_next, min(self._val_next + micro, len(self._ids)))
            batch = merge_batches([self._samples[r] for r in rows])
            batch["ids"] = [self._ids[r] for r in rows]
            out.append(batch)
            self._val_next = rows.stop
        return out

    def rank_streams(self, num_ranks: int) -> list[OutputTaskStream]:
        """One stream per encoder rank, starting where the driver is (rank ``r`` gets micro-batches ``r, r+n, …``)."""
        if self.finite:
            raise ValueError("rank_streams() serves the endless train split; use next_step() for val")
        return [self._stream(r, num_ranks) for r in range(num_ranks)]

    def advance(self, steps: int = 1) -> None:
        """Record that ``steps`` optimizer steps were consumed by the rank streams."""
        self.next_micro += steps * self.micro_per_step

    def close(self) -> None:
        """Nothing held outside this process."""
