"""The consumed-samples ledger: ``<output_dir>/samples.jsonl``, one ``{"step", "ids"}`` row per optimizer step.

It is the audit trail of what a run trained on: a resumed or recovered run first drops the rows of steps after the
checkpoint it loaded (those steps are re-run), so at the end every step appears once and, with the data position
restored exactly, the ledger equals the one an uninterrupted run writes — no sample consumed twice or skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class SampleLedger:
    """Append-only per-step list of sample ids, truncated on resume.

    Args:
        out_dir: the run directory.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.path = Path(out_dir) / "samples.jsonl"

    def truncate_after(self, step: int) -> None:
        """Drop the rows of steps > ``step``."""
        rows = [r for r in self.read() if r["step"] <= step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def write(self, step: int, ids: list[str]) -> None:
        """Record the ids trained on in ``step``."""
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "ids": list(ids)}) + "\n")

    def read(self) -> list[dict]:
        """All rows, in file order (``[]`` when there is no ledger yet)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
