"""Batched inference with a trained MIMO checkpoint: encoder group forward-only, LM generation with a KV cache,
one JSONL row per input id (quarantined inputs are listed with their error).

Local:   python jobs/infer.py --checkpoint runs/tiny --data-path data/syn/val.jsonl --output preds.jsonl
Resume:  python jobs/infer.py ... --resume            (skips ids already in --output)
Options: --infer.batch_size=8 --infer.max_new_tokens=16 --infer.temperature=0.7 --infer.top_p=0.9 --runtime fused
Prompts: python jobs/infer.py --checkpoint runs/x --prompt "Describe it." --video clip.mp4 --output out.jsonl
         python jobs/infer.py --checkpoint runs/x --prompt "Once upon a time" --prompt "..." --chat-template none
Cluster: ray job submit --working-dir . -- python jobs/infer.py --checkpoint /shared/run --data-path ...
"""

from __future__ import annotations

import json
from pathlib import Path

from mimo_ray.cli.train import ensure_ray
from mimo_ray.config_cli import parse_job_args
from mimo_ray.driver import checkpoint as ckpt_lib
from mimo_ray.observability import init_logging


def _extra(parser) -> None:  # noqa: ANN001
    parser.add_argument("--no-cache", action="store_true", help="naive generation: re-run the prefix per token")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt instead of --data-path (repeatable)")
    for field in ("video", "audio", "image"):
        parser.add_argument(f"--{field}", default=None, help=f"{field} file for a single --prompt")
    parser.add_argument("--chat-template", default=None,
                        help="'none' (raw text, plain completion), a template or a template file; default: the run's")


def main(argv: list[str] | None = None) -> dict:
    """Parse, check paths, run inference; returns the summary."""
    cfg, ns = parse_job_args(argv, doc=__doc__, extra=_extra)
    init_logging("infer")
    if ns.print_config:
        from mimo_ray.config_cli import config_to_dict

        print(json.dumps(config_to_dict(cfg), indent=1))
        return {}
    if cfg.infer.checkpoint is None:
        raise SystemExit("error: --checkpoint is required")
    media = {f: getattr(ns, f) for f in ("video", "audio", "image") if getattr(ns, f)}
    if ns.prompt:
        if cfg.data.data_path is not None:
            raise SystemExit("error: give --prompt or --data-path, not both")
        from mimo_ray.driver.infer_loop import write_prompt_manifest

        out = Path(cfg.infer.output)
        try:
            step = ckpt_lib.resolve(cfg.infer.checkpoint)
            modalities = json.loads((step / "driver.json").read_text())["config"]["model"]["modalities"]
            path = write_prompt_manifest(ns.prompt, media, out.with_name(out.stem + ".prompts.jsonl"), modalities)
        except ValueError as err:
            raise SystemExit(f"error: {err}") from None
        cfg.data.data_path = str(path)
    elif media:
        raise SystemExit("error: --video/--audio/--image need a --prompt")
    if cfg.data.data_path is None:
        raise SystemExit("error: --data-path (or --prompt) is required")
    if not Path(cfg.data.data_path).exists():
        raise SystemExit(f"error: --data-path {cfg.data.data_path!r} does not exist")
    try:
        ckpt_lib.resolve(cfg.infer.checkpoint)
    except ValueError as err:
        raise SystemExit(f"error: --checkpoint: {err}") from None
    ensure_ray(cfg)
    from mimo_ray.driver.infer_loop import run_inference

    summary = run_inference(
        cfg, cfg.infer.checkpoint, cfg.data.data_path, cfg.infer.output, resume=cfg.train.resume,
        use_cache=not ns.no_cache, chat_template=ns.chat_template,
    )
    print("\n".join(["== inference =="] + [f"{k:>16}: {v}" for k, v in summary.items()]))
    return summary


if __name__ == "__main__":
    main()
