"""Result tables of the benchmark: printed as Markdown (paste-able into ``docs/PERFORMANCE.md``) and saved as JSON.

Example:
    table = Table("step", "Train step (tiny)", ["runtime", "step ms"], notes=["2 cores"])
    table.add(["fused", 81.2]); print(table.render()); write_json("bench.json", {"step": table.to_dict()})
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def fmt(value: Any) -> str:
    """A cell as text: floats with 3 significant digits (thousands grouped), ``-`` for None/NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value == 0 or math.isinf(value):
        return f"{value:g}"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    digits = max(0, 2 - int(math.floor(math.log10(magnitude))))
    return f"{value:.{digits}f}"


def ratio(num: float | None, den: float | None) -> float:
    """``num / den`` or NaN when either is missing or ``den`` is 0."""
    if num is None or den is None or den == 0 or math.isnan(num) or math.isnan(den):
        return float("nan")
    return num / den


@dataclass
class Table:
    """One side-by-side table of a sub-command.

    Attributes:
        name: sub-command (``step``, ``transport``, …).
        title: one-line caption.
        columns: column headers.
        rows: cells, one list per row (``len(columns)`` each).
        notes: lines printed under the table (set-up, peak used, what limits the numbers).
        extra: further JSON-only numbers (raw samples, FLOP breakdowns).
    """

    name: str
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, row: list[Any]) -> None:
        """Append a row.

        Raises:
            ValueError: the row does not have one cell per column.
        """
        if len(row) != len(self.columns):
            raise ValueError(f"table {self.name}: row {row} has {len(row)} cells for {len(self.columns)} columns")
        self.rows.append(list(row))

    def render(self) -> str:
        """Markdown table with the title above and the notes below."""
        cells = [[fmt(c) for c in row] for row in self.rows]
        widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(self.columns)]

        def line(parts: list[str]) -> str:
            return "| " + " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)) + " |"

        out = [f"### {self.title}", "", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in cells]
        out += [""] + [f"- {n}" for n in self.notes] if self.notes else []
        return "\n".join(out)

    def records(self) -> list[dict[str, Any]]:
        """Rows as ``{column: value}`` dicts."""
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: title, columns, rows, records, notes and extra."""
        return {
            "title": self.title,
            "columns": self.columns,
            "rows": self.rows,
            "records": self.records(),
            "notes": self.notes,
            "extra": self.extra,
        }


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (NaN becomes null), creating the parent folder."""

    def clean(obj: Any) -> Any:
        if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
            return None
        if isinstance(obj, dict):
            return {str(k): clean(v) for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return [clean(v) for v in obj]
        return obj

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(clean(data), indent=1, default=str))
