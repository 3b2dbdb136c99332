"""Bad-input records (DESIGN C8): one JSONL row per unusable manifest row, plus counters and the bad-data gate.

    log = QuarantineLog("runs/x/quarantine.jsonl", manifest="/data/train.jsonl")
    log.add(BadRow(id="syn-7", path="/data/clips/syn-7.mp4", stage="frames", error="clip has 3 frames ..."))
    log.count                      # distinct bad ids of this manifest, including those of earlier runs

Rows are keyed by ``(manifest, id)``: a bad row met again (next epoch, resumed run) is not written twice. A
transient failure (``timeout``, ``crash``, ``error``) is the outcome of one epoch: it gets one record per
``(manifest, id, epoch)``, which :mod:`mimo_ray.data.bad_memory` reads back to replay exactly what a run consumed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

#: Stages a quarantined row can name (media stages come from :class:`mimo_ray.data.errors.MediaError`).
STAGES = (
    "manifest",  # the manifest row itself is malformed (bad JSON, no id, duplicate id, no conversations)
    "tags",  # modality tags do not match the media fields / the model's modalities
    "text",  # the tokenised conversation is longer than model.lm.seq_length
    "open",  # missing or zero-byte file
    "decode",  # not a decodable video / image
    "frames",  # fewer frames than model.vision.num_frames
    "audio",  # no audio stream where audio is required, or undecodable audio
    "truncated",  # audio much shorter than its header or the video says
    "timeout",  # the decoder hung past data.decode_timeout_s on every try
    "crash",  # the decoder process died (native abort/segfault) on every try
    "error",  # any other exception while preparing the sample
)
#: Stages whose failure repeats whenever the row is decoded again (skipped from then on, never decoded again).
DETERMINISTIC_STAGES = frozenset({"manifest", "tags", "text", "open", "decode", "frames", "audio", "truncated"})
#: Stages that may pass on another try: the decoder hung or died, or an unexpected exception escaped.
TRANSIENT_STAGES = frozenset({"timeout", "crash", "error"})
QUARANTINE_FILE = "quarantine.jsonl"
log = logging.getLogger("mimo_ray")


class DataQualityError(RuntimeError):
    """Too much of the data is bad (``data.max_bad_fraction``)."""


@dataclass
class BadRow:
    """One quarantined sample: ``id, path, stage, error`` (+ where it came from)."""

    id: str
    path: str
    stage: str
    error: str
    manifest: str = ""
    row: int = -1
    split: str = ""
    epoch: int = -1  # the epoch it failed in (-1: not known)
    kind: str = ""  # "deterministic" or "transient" (:func:`kind_of`); "" is taken from the stage


def kind_of(stage: str) -> str:
    """``"transient"`` for :data:`TRANSIENT_STAGES`, else ``"deterministic"``."""
    return "transient" if stage in TRANSIENT_STAGES else "deterministic"


def _key(rid: str, stage: str, epoch: int) -> tuple[str, int]:
    """Dedup key of a record: one per deterministic id, one per transient ``(id, epoch)``."""
    return (rid, epoch) if kind_of(stage) == "transient" else (rid, -2)


def quarantine_path(output_dir: str | os.PathLike) -> Path:
    """``<train.output_dir>/quarantine.jsonl``."""
    return Path(output_dir) / QUARANTINE_FILE


def read_quarantine(path: str | os.PathLike, manifest: str | None = None) -> list[dict]:
    """Records of a quarantine file (those of ``manifest`` only, when given); a missing file is empty."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if manifest is None or rec.get("manifest") == manifest:
                records.append(rec)
    return records


def bad_ids(path: str | os.PathLike, manifest: str) -> set[str]:
    """Ids of ``manifest`` already quarantined in the file at ``path``."""
    return {str(r["id"]) for r in read_quarantine(path, manifest)}


class QuarantineLog:
    """Append-only writer of one manifest's bad rows; thread-safe, one ``write`` per line.

    Args:
        path: the JSONL file (created with its folder on the first bad row).
        manifest: absolute path of the manifest the rows belong to.
        write: ``False`` counts without writing (``jobs/validate.py``).
    """

    def __init__(self, path: str | os.PathLike | None, manifest: str, write: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.manifest = manifest
        self.write = write and self.path is not None
        self._lock = threading.Lock()
        records = read_quarantine(self.path, manifest) if self.path is not None else []
        self._seen = {_key(str(r["id"]), str(r.get("stage", "")), int(r.get("epoch", -1))) for r in records}
        self._ids = {rid for rid, _ in self._seen}
        self.new: list[BadRow] = []

    @property
    def count(self) -> int:
        """Distinct bad ids of this manifest (earlier runs included)."""
        return len(self._ids)

    def add(self, bad: BadRow) -> bool:
        """Record ``bad``; returns ``False`` when it was already quarantined (its id, or for a transient failure its
        id in that epoch).
        """
        with self._lock:
            key = _key(bad.id, bad.stage, bad.epoch)
            if key in self._seen:
                return False
            self._seen.add(key)
            self._ids.add(bad.id)
            if not bad.kind:
                bad.kind = kind_of(bad.stage)
            self.new.append(bad)
            log.warning("quarantined %s [%s] %s", bad.id, bad.stage, bad.error)
            if self.write:
                rec = {**asdict(bad), "manifest": self.manifest, "time": round(time.time(), 3)}
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with self.path.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            return True


class BadBudget:
    """The ``data.max_bad_fraction`` gate: more than ``fraction * num_rows`` bad rows in one epoch stops the job.

    Args:
        num_rows: rows in the manifest.
        fraction: ``data.max_bad_fraction``.
        manifest: for the message.
    """

    def __init__(self, num_rows: int, fraction: float, manifest: str) -> None:
        self.num_rows = num_rows
        self.fraction = fraction
        self.manifest = manifest
        self.epoch: int | None = None
        self.bad = 0

    def add(self, epoch: int, bad: BadRow) -> None:
        """Count a bad row of ``epoch``.

        Raises:
            DataQualityError: the epoch's bad rows exceed ``max_bad_fraction * num_rows``.
        """
        if self.epoch is not None and epoch != self.epoch:
            self.bad = 0
        self.epoch = epoch
        self.bad += 1
        if self.bad > self.fraction * self.num_rows:
            raise DataQualityError(
                f"{self.bad} of the {self.num_rows} rows of {self.manifest} are bad, more than "
                f"data.max_bad_fraction={self.fraction}; latest: id={bad.id} stage={bad.stage}: {bad.error}. "
                f"See the quarantine file for every bad row, or run jobs/validate.py --data-path {self.manifest}"
            )

    def start_epoch(self, epoch: int, already_bad: int = 0) -> None:
        """Position the gate at ``epoch`` with ``already_bad`` bad rows met so far in it."""
        self.epoch = epoch
        self.bad = already_bad
