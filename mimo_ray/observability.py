"""Logging with a ``[stage/rank]`` prefix, per-step metrics (JSONL + TensorBoard scalars), and the end-of-run
loss/throughput plot.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any


def init_logging(prefix: str = "driver", level: int = logging.INFO) -> logging.Logger:
    """Configure the ``mimo_ray`` logger once per process with a ``[prefix]`` tag."""
    logger = logging.getLogger("mimo_ray")
    logger.setLevel(level)
    if not any(getattr(h, "_mimo_ray", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._mimo_ray = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False
    for handler in logger.handlers:
        handler.setFormatter(logging.Formatter(f"%(asctime)s [{prefix}] %(message)s", "%H:%M:%S"))
    return logger


class MetricsWriter:
    """Appends one JSON line per record to ``metrics.jsonl`` and mirrors numbers to TensorBoard.

    Args:
        output_dir: run directory; ``metrics.jsonl`` and ``tb/`` go there.
        tensorboard: also write TensorBoard scalars (skipped quietly if tensorboard is not importable).
    """

    def __init__(self, output_dir: str | os.PathLike, tensorboard: bool = True) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.dir / "tb"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drop records of steps > ``step`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(f"{line}\n" for line in keep))

    def write(self, record: dict[str, Any], prefix: str = "train") -> None:
        """Append a record (must hold ``step``) and log its numbers as ``<prefix>/<key>``."""
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Plot training (and eval) loss and tokens/s against step into a PNG.

    Returns:
        The PNG path.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("split", "train") == "train"]
    evals = [r for r in records if r.get("split") == "val"]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="val")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_tps.plot([r["step"] for r in train], [r.get("tokens_per_s", 0.0) for r in train], color="tab:green")
    ax_tps.set_xlabel("step")
    ax_tps.set_ylabel("tokens/s")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return Path(out_png)
