"""Train a MIMO model: encoder and language-model actor groups on Ray (default) or one fused process.

Local (embedded Ray, CPU):  python jobs/train.py --preset tiny --max-steps 20 --output-dir runs/tiny
Fused reference:            python jobs/train.py --preset tiny --runtime fused --max-steps 20
Real data:                  python jobs/train.py --preset tiny --data-path data/syn/train.jsonl --val-path ...
Resume:                     python jobs/train.py ... --output-dir runs/tiny --resume
Start over in a used dir:   python jobs/train.py ... --output-dir runs/tiny --overwrite   (deletes its checkpoints)
Cluster:                    ray job submit --working-dir . -- python jobs/train.py --preset bench-s ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mimo_ray.config import Config
from mimo_ray.config_cli import config_to_dict, parse_job_args
from mimo_ray.observability import init_logging


def check_paths(cfg: Config) -> None:
    """Fail before any actor starts when an input path is missing, naming the flag and the path."""
    for flag, path in (("--data-path", cfg.data.data_path), ("--val-path", cfg.data.val_path)):
        if path is not None and not Path(path).exists():
            raise SystemExit(f"error: {flag} {path!r} does not exist")


def check_run_dir(cfg: Config) -> None:
    """Fail before Ray or any actor starts when the output directory holds another run's checkpoints (without
    ``--resume``/``--overwrite``) or when ``--resume`` meets an incompatible config, in one line.
    """
    from mimo_ray.driver.run_dir import check_output_dir

    try:
        check_output_dir(cfg)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def ensure_ray(cfg: Config) -> None:
    """Attach to a cluster (RAY_ADDRESS / cluster.address) or start an embedded local Ray."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(**cfg.cluster.init_kwargs(), log_to_driver=True)


def main(argv: list[str] | None = None) -> dict:
    """Parse, set up, train; returns the run summary."""
    cfg, ns = parse_job_args(argv, doc=__doc__)
    log = init_logging("driver")
    if ns.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return {}
    check_paths(cfg)
    check_run_dir(cfg)
    log.info("config: %s", json.dumps(config_to_dict(cfg), sort_keys=True))
    if cfg.train.runtime == "disaggregated" or cfg.data.data_path:
        ensure_ray(cfg)
    from mimo_ray.driver.train_loop import TrainLoop

    with TrainLoop.build(cfg) as loop:
        summary = loop.run()
    print("\n".join(["== summary =="] + [f"{k:>13}: {v}" for k, v in summary.items()]))
    return summary


if __name__ == "__main__":
    main()
