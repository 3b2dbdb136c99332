"""Check a manifest without training: every file exists and decodes to the shapes the encoders take, tags match the
media and the model's modalities, and every conversation fits ``model.lm.seq_length``. Prints a report; exit code 1
when any row is bad.

Local:   python jobs/validate.py --data-path data/syn/train.jsonl [--preset tiny] [--num-frames 8] [--report r.json]
Cluster: ray job submit --working-dir . -- python jobs/validate.py --data-path /shared/data/train.jsonl
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import parse_job_args
from mimo_ray.observability import init_logging


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--report", default=None, metavar="PATH", help="also write the report as JSON here")
    parser.add_argument("--max-listed", type=int, default=50, help="bad rows printed (all go to --report)")


def validate_manifest(cfg: Config, manifest_path: str) -> dict[str, Any]:
    """Decode and tokenise every row of ``manifest_path`` (in parallel on Ray Data) and summarise.

    Returns:
        ``{"manifest", "rows", "ok", "bad", "bad_by_stage", "bad_rows": [{id, path, stage, error}], "tokens":
        {"max", "mean"}, "seq_length", "placeholders", "audio_from_video"}``.
    """
    import numpy as np

    from mimo_ray.data.manifest import media_folders, read_manifest
    from mimo_ray.data.pipeline import build_dataset
    from mimo_ray.data.tokenizer import ChatTokenizer
    from mimo_ray.model.spec import tokens_per_sample
    from mimo_ray.runtime.placement import stage_cpu_reservation

    manifest = read_manifest(manifest_path, media_folders(cfg))
    pad_id = ChatTokenizer.from_config(cfg).pad_id
    ds = build_dataset(cfg, "validate", manifest_path=manifest_path, reserved_cpus=stage_cpu_reservation(cfg))
    columns = ["row", "id", "ok", "stage", "error", "path", "tokens"]
    bad_rows, lengths, placeholder_errors = [], [], []
    expected = {m: tokens_per_sample(cfg, m) for m in cfg.model.modalities}
    for table in ds.select_columns(columns).iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in table.to_pylist():
            if not row["ok"]:
                bad_rows.append({k: row[k] for k in ("id", "path", "stage", "error")})
                continue
            ids = np.frombuffer(row["tokens"], dtype=np.int32)
            lengths.append(int((ids != pad_id).sum()))
            for mod, count in expected.items():
                found = int((ids == cfg.model.special_token_ids[mod]).sum())
                if found != count:
                    placeholder_errors.append(f"{row['id']}: {found} {mod} placeholders, expected {count}")
    media = manifest.table.select(["video", "audio", "error"]).to_pylist()
    audio_from_video = sum(1 for r in media if r["video"] and not r["audio"] and not r["error"])
    return {
        "manifest": manifest.path,
        "rows": len(manifest),
        "ok": len(manifest) - len(bad_rows),
        "bad": len(bad_rows),
        "bad_by_stage": dict(Counter(r["stage"] for r in bad_rows)),
        "bad_rows": bad_rows,
        "tokens": {"max": max(lengths, default=0), "mean": float(np.mean(lengths)) if lengths else 0.0},
        "seq_length": cfg.model.lm.seq_length,
        "placeholders": expected,
        "placeholder_errors": placeholder_errors,
        "audio_from_video": audio_from_video if "audio" in cfg.model.modalities else 0,
    }


def format_report(report: dict[str, Any], max_listed: int = 50) -> str:
    """Human-readable report."""
    lines = [
        f"== validate {report['manifest']} ==",
        f"rows: {report['rows']}   ok: {report['ok']}   bad: {report['bad']}",
        f"tokens per conversation (with placeholders): max {report['tokens']['max']}, "
        f"mean {report['tokens']['mean']:.1f}; model.lm.seq_length={report['seq_length']}",
        f"placeholders per sample: {report['placeholders']}; audio taken from the video: {report['audio_from_video']}",
    ]
    if report["bad"]:
        lines.append("bad by stage: " + ", ".join(f"{k}={v}" for k, v in sorted(report["bad_by_stage"].items())))
        for row in report["bad_rows"][:max_listed]:
            lines.append(f"  {row['id']}  [{row['stage']}]  {row['error']}")
        if report["bad"] > max_listed:
            lines.append(f"  ... {report['bad'] - max_listed} more (see --report)")
    lines.extend(f"  placeholder mismatch: {e}" for e in report["placeholder_errors"])
    lines.append("OK" if not report["bad"] and not report["placeholder_errors"] else "FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Validate ``--data-path`` (and ``--val-path`` when given); returns the exit code."""
    cfg, ns = parse_job_args(argv, doc=__doc__, extra=_extra)
    init_logging("validate")
    paths = [p for p in (cfg.data.data_path, cfg.data.val_path) if p]
    if not paths:
        raise SystemExit("error: --data-path is required")
    for flag, path in (("--data-path", cfg.data.data_path), ("--val-path", cfg.data.val_path)):
        if path and not Path(path).exists():
            raise SystemExit(f"error: {flag} {path!r} does not exist")
    import ray

    if not ray.is_initialized():
        ray.init(**cfg.cluster.init_kwargs(), log_to_driver=False)
    reports = [validate_manifest(cfg, p) for p in paths]
    for report in reports:
        print(format_report(report, ns.max_listed))
    if ns.report:
        Path(ns.report).write_text(json.dumps(reports if len(reports) > 1 else reports[0], indent=1))
    return 1 if any(r["bad"] or r["placeholder_errors"] for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
