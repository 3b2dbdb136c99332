"""Benchmark harness (issue #7): each sub-command prints a side-by-side ratio table measured in one run.

    python jobs/bench.py step      [--runtimes fused,disaggregated] [--peak-tflops T]   train step, tokens/s, MFU
    python jobs/bench.py transport [--sizes-mib 16,64,256]        actor hand-off GB/s vs memcpy, call latency
    python jobs/bench.py decode    [--decode-clips 32 --workers 2]   delegates to jobs/bench_decode.py
    python jobs/bench.py stall     [--stall-samples 64]           Ray Data pipeline vs in-memory → stall %
    python jobs/bench.py infer     [--infer-batch-size 4 --max-new-tokens 16]   disaggregated vs one process vs naive
    python jobs/bench.py all --preset tiny --json runs/bench/tiny.json

Common flags: --preset (default tiny) plus any config override (--model.lm.num_layers=4, --micro-batch-size 2),
--repeats N (timed repeats, median reported; default 10), --warmup N (untimed first; default 2), --json OUT.
Ray: attaches to RAY_ADDRESS / cluster.address, else starts a local instance (after ``decode``, which starts and
stops its own). Numbers are noisy on small machines; never assert them in tests.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mimo_ray.cli.synthetic import load_synthetic_module
from mimo_ray.config import Config
from mimo_ray.config_cli import config_to_dict, parse_job_args, save_config
from mimo_ray.perf.report import Table, ratio, write_json

#: The source checkout (``datasets/make_synthetic.py`` lives there, outside the package).
ROOT = Path(__file__).resolve().parents[2]

SUBCOMMANDS = ("decode", "transport", "step", "stall", "infer")
DEFAULT_THREADS = torch.get_num_threads()  # before any stage pins this process to parallel.torch_num_threads


def _extra(parser) -> None:  # noqa: ANN001
    g = parser.add_argument_group("benchmark")
    g.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    g.add_argument("--warmup", type=int, default=2, help="untimed repeats before timing")
    g.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the numbers here")
    g.add_argument("--timeout-s", type=float, default=300.0, help="bound of every wait on an actor")
    g.add_argument(
        "--runtimes",
        default=None,
        help="step/stall: runtimes to compare (default: step fused,disaggregated; stall disaggregated)",
    )
    g.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="step: MFU peak (default: the GPU's dense bf16 spec, H100/H200 989, A100 312; else a GEMM probe here)",
    )
    g.add_argument("--sizes-mib", default="16,64,256", help="transport: payload sizes in MiB")
    g.add_argument("--workers", type=int, default=None, help="decode: W (default data.num_decode_workers)")
    g.add_argument("--decode-clips", type=int, default=32, help="decode: synthetic clips")
    g.add_argument("--decode-size", default="224x224", help="decode: clip WIDTHxHEIGHT")
    g.add_argument("--decode-seconds", type=float, default=4.0, help="decode: clip duration")
    g.add_argument("--decode-read-videos", action="store_true", help="decode: add the ray.data.read_videos row")
    g.add_argument("--decode-runs", type=int, default=1, help="decode: runs of bench_decode.py (median per method)")
    g.add_argument(
        "--stall-samples",
        type=int,
        default=None,
        help="stall: synthetic samples (default: enough for warm-up + repeats + 2 steps in one epoch)",
    )
    g.add_argument("--stall-size", default="64x64", help="stall: synthetic clip WIDTHxHEIGHT (2 s at 8 fps + tone)")
    g.add_argument("--data-dir", default=None, help="decode/stall: keep (and reuse) the synthetic data here")
    g.add_argument("--infer-batch-size", type=int, default=4, help="infer: prompts per batch")
    g.add_argument("--max-new-tokens", type=int, default=16, help="infer: generated tokens per prompt")
    g.add_argument("--prompt-text-len", type=int, default=10, help="infer: text tokens after the media tokens")


# ----- decode: the data engineer's benchmark ------------------------------------------------------------------------
def _decode_results(argv: list[str]) -> dict[str, float]:
    """``jobs/bench_decode.py main(argv)``: in this process when Ray is not running (it starts and stops its own),
    else in a child process.
    """
    import ray

    if not ray.is_initialized():
        from mimo_ray.cli.bench_decode import main as decode_main

        return dict(decode_main(argv))
    marker = "@@BENCH_DECODE@@"
    code = (f"import json; from mimo_ray.cli.bench_decode import main; "
            f"print({marker!r} + json.dumps(main({argv!r})))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode or not lines:
        raise RuntimeError(f"jobs/bench_decode.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(proc.stdout.replace(lines[-1], ""))
    return json.loads(lines[-1][len(marker) :])


def decode_table(cfg: Config, ns: Any, workdir: Path) -> Table:
    """Clips/s of Ray Data vs a raw decode loop vs ``Pool(W)``, measured by ``jobs/bench_decode.py``."""
    workers = ns.workers or cfg.data.num_decode_workers
    config_file = workdir / "decode_config.yaml"
    save_config(cfg, config_file)
    argv = ["--config", str(config_file), "--num-clips", str(ns.decode_clips), "--workers", str(workers),
            "--size", ns.decode_size, "--seconds", str(ns.decode_seconds),
            "--data-dir", str(Path(ns.data_dir, "decode") if ns.data_dir else workdir / "decode")]  # fmt: skip
    if not ns.decode_read_videos:
        argv.append("--skip-read-videos")
    runs = [_decode_results(argv) for _ in range(max(ns.decode_runs, 1))]
    results = {name: statistics.median(r[name] for r in runs if name in r) for name in runs[0]}
    raw = results.get("raw (1 process)")
    pool = results.get(f"Pool({workers})")
    table = Table("decode", f"Clip decode, W={workers}: Ray Data vs one process vs Pool(W)",
                  ["method", "clips/s", "vs raw loop", "vs Pool(W)"])  # fmt: skip
    for name, rate in results.items():
        table.add([name, rate, ratio(rate, raw), ratio(rate, pool)])
    table.extra["runs_clips_per_s"] = runs
    table.notes += [
        f"measured by jobs/bench_decode.py {' '.join(argv[2:])} (its method: one timed pass per method after a "
        f"warm-up; the pipeline's first (cold) and second (warm) pass); median over {len(runs)} run(s) of it",
        f"{ns.decode_clips} synthetic H.264 clips {ns.decode_size}, {ns.decode_seconds:g} s at 8 fps; "
        f"{cfg.model.vision.num_frames} frames per clip resized to {cfg.model.vision.img_size} px, CLIP-normalised",
    ]
    return table


# ----- set-up helpers -----------------------------------------------------------------------------------------------
def _ensure_ray(cfg: Config) -> None:
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(**cfg.cluster.init_kwargs(), log_to_driver=False)


def _stall_manifest(cfg: Config, ns: Any, workdir: Path) -> str:
    """A synthetic data set (``--stall-size`` clips, 2 s, a tone) big enough that the timed steps stay in one epoch."""
    samples = ns.stall_samples or (ns.warmup + ns.repeats + 2) * cfg.data.global_batch_size
    name = f"stall-{ns.stall_size}"
    root = Path(ns.data_dir, name) if ns.data_dir else workdir / name
    manifest = root / "train.jsonl"
    if not manifest.exists() or len(manifest.read_text().splitlines()) != samples:
        start = time.perf_counter()
        size = tuple(int(x) for x in ns.stall_size.lower().split("x"))
        load_synthetic_module().make_synthetic(root, samples, seconds=2.0, fps=8, size=size, seed=0, val_fraction=0.0)
        print(f"made {samples} synthetic samples under {root} in {time.perf_counter() - start:.1f} s")
    return str(manifest)


def _runtimes(text: str | None, default: tuple[str, ...]) -> list[str]:
    from mimo_ray.perf.train_bench import RUNTIMES

    if text is None:
        return list(default)
    names = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in names if r not in RUNTIMES]
    if bad or not names:
        raise SystemExit(f"error: --runtimes {text!r}: choose from {', '.join(RUNTIMES)}")
    return names


def _peak(cfg: Config, ns: Any) -> tuple[float, str]:
    """MFU peak: ``--peak-tflops``, else measured now (before Ray or any stage process competes for the cores)."""
    from mimo_ray.perf.host import default_peak_tflops

    if ns.peak_tflops is not None:
        return ns.peak_tflops, "--peak-tflops"
    return default_peak_tflops(cfg.model.params_dtype, threads=DEFAULT_THREADS)


def _run(command: str, cfg: Config, ns: Any, workdir: Path, cache: Any) -> Table:
    if command == "decode":
        return decode_table(cfg, ns, workdir)
    if command != "step" or "disaggregated" in _runtimes(ns.runtimes, ("fused", "disaggregated")):
        _ensure_ray(cfg)  # a fused-only step needs no Ray
    if command == "transport":
        from mimo_ray.perf.transport_bench import transport_table

        sizes = [int(s) for s in ns.sizes_mib.split(",") if s.strip()]
        return transport_table(sizes, ns.repeats, ns.warmup, ns.timeout_s, threads=DEFAULT_THREADS)
    if command == "step":
        from mimo_ray.perf.train_bench import step_table

        runtimes = _runtimes(ns.runtimes, ("fused", "disaggregated"))
        return step_table(cfg, runtimes, ns.repeats, ns.warmup, ns.peak, cache)
    if command == "stall":
        from mimo_ray.perf.train_bench import stall_table

        manifest = _stall_manifest(cfg, ns, workdir)
        runtimes = _runtimes(ns.runtimes, ("disaggregated",))
        return stall_table(cfg, runtimes, ns.repeats, ns.warmup, manifest, str(workdir / "stall_run"), cache)
    cache.close()  # free the training actors before the inference ones start
    from mimo_ray.perf.infer_bench import infer_table

    return infer_table(cfg, ns.repeats, ns.warmup, ns.infer_batch_size, ns.max_new_tokens, ns.prompt_text_len)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one sub-command (or ``all``); print its table(s).

    Returns:
        ``{"machine": …, "config": …, <sub-command>: Table.to_dict(), …}`` (also written to ``--json``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: bench.py {" + ",".join((*SUBCOMMANDS, "all")) + "} [options]   (bench.py <sub> --help)")
        print(__doc__)
        raise SystemExit(0)
    if not argv or argv[0] not in (*SUBCOMMANDS, "all"):
        print(__doc__)
        raise SystemExit(f"error: first argument must be one of {', '.join((*SUBCOMMANDS, 'all'))}")
    command = argv[0]
    cfg, ns = parse_job_args(argv[1:], doc=__doc__, extra=_extra)
    if ns.print_config:
        print(json.dumps(config_to_dict(cfg), indent=1))
        return {}
    if ns.repeats < 1 or ns.warmup < 0:
        raise SystemExit(f"error: --repeats {ns.repeats} must be >= 1 and --warmup {ns.warmup} >= 0")
    from mimo_ray.perf.host import machine_info

    out: dict[str, Any] = {"machine": {**machine_info(), "torch_threads": DEFAULT_THREADS},
                           "command": ["jobs/bench.py", *argv], "config": config_to_dict(cfg)}  # fmt: skip
    print("machine: " + ", ".join(f"{k} {v}" for k, v in out["machine"].items()))
    commands = SUBCOMMANDS if command == "all" else (command,)
    if "step" in commands:
        ns.peak = _peak(cfg, ns)
    start = time.perf_counter()
    from mimo_ray.perf.train_bench import RuntimeCache

    with tempfile.TemporaryDirectory(prefix="mimo_bench_") as tmp, RuntimeCache(cfg) as cache:
        for name in commands:
            t0, load = time.perf_counter(), os.getloadavg()[0]
            table = _run(name, cfg, ns, Path(tmp), cache)
            table.notes.append(
                f"wall time of this sub-command: {time.perf_counter() - t0:.1f} s; 1-min load average "
                f"before / after: {load:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
            )
            print("\n" + table.render() + "\n", flush=True)
            out[name] = table.to_dict()
    out["wall_s"] = time.perf_counter() - start
    print(f"total wall time {out['wall_s']:.1f} s")
    if ns.json_out:
        write_json(ns.json_out, out)
    return out


if __name__ == "__main__":
    main()
