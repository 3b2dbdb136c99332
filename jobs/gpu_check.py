"""One command, one GPU, under 10 minutes: is mimo_ray ready for GPU training and serving?

    python jobs/gpu_check.py                     # bench-s, bf16, SDPA (flash) attention, CUDA IPC at 0.5 GPU/actor
    python jobs/gpu_check.py --json runs/gpu_check.json --repeats 10
    python jobs/gpu_check.py --device cpu --preset tiny --skip step_table,transport_table   # harness smoke test

Checks (a PASS/FAIL table with the numbers at the end, exit status 1 if any fails):
  fused_step          bf16 fused train steps: parameters bf16 on the GPU, finite losses, step time
  kv_cache            greedy generation with Megatron's KV cache equals generation without it
  output_decoding     image and audio output decoders (incl. Griffin-Lim) run on the GPU, outputs in range
  disaggregated_step  bf16 disaggregated train steps, encoder and LM actors sharing the GPU over CUDA IPC
  loss_agreement      fused vs disaggregated loss on the same batches (step 1 <= 1e-3 relative, all <= 2e-2)
  step_table          jobs/bench.py step table: step time, tokens/s, MFU against the GPU's dense bf16 spec
  transport_table     jobs/bench.py transport table: hand-off GB/s incl. RDT cuda_ipc, control latency

Needs ray, megatron-core 0.16.1 and (for NCCL paths, not used here) the `gpu` extra. Without CUDA it refuses unless
``--device cpu`` is given. Extra ``key=value`` arguments override the config (e.g. data.micro_batch_size=2).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_PRESET = {"cuda": "bench-s", "cpu": "tiny"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command line → namespace (``overrides`` holds the ``key=value`` arguments).

    Raises:
        SystemExit: malformed arguments (argparse names the flag).
    """
    from mimo_ray.perf.gpu_check import CHECK_NAMES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: smoke-test the harness")
    ap.add_argument("--preset", default=None, help="model preset (default: bench-s on cuda, tiny on cpu)")
    ap.add_argument("--steps", type=int, default=3, help="train steps per runtime for the loss agreement")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats of the bench tables (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed repeats first")
    ap.add_argument("--sizes-mib", default="16,64,256", help="transport table payload sizes in MiB")
    ap.add_argument("--skip", default="", help=f"comma-separated checks to leave out: {', '.join(CHECK_NAMES)}")
    ap.add_argument("--timeout-s", type=float, default=300.0, help="bound of every wait on an actor")
    ap.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    ns = ap.parse_args(argv)
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        ap.error(f"config overrides must be key=value, got {bad}")
    if ns.steps < 1 or ns.repeats < 1 or ns.warmup < 0:
        ap.error(f"--steps {ns.steps} and --repeats {ns.repeats} must be >= 1, --warmup {ns.warmup} >= 0")
    try:
        ns.sizes_mib = [int(s) for s in ns.sizes_mib.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--sizes-mib {ns.sizes_mib!r} must be comma-separated integers")
    ns.skip = {s.strip() for s in ns.skip.split(",") if s.strip()}
    unknown = sorted(ns.skip - set(CHECK_NAMES))
    if unknown:
        ap.error(f"--skip {unknown}: unknown checks; choose from {', '.join(CHECK_NAMES)}")
    ns.preset = ns.preset or DEFAULT_PRESET[ns.device]
    return ns


def main(argv: list[str] | None = None) -> dict:
    """Run the checks; print the bench tables and the pass/fail table; returns the results (also ``--json``)."""
    ns = parse_args(argv)
    import torch

    if ns.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "error: jobs/gpu_check.py needs a CUDA GPU and torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}); to smoke-test the harness on CPU run: "
            "python jobs/gpu_check.py --device cpu --preset tiny"
        )
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from mimo_ray.config_cli import load_config
    from mimo_ray.parallel.megatron_setup import init_megatron
    from mimo_ray.perf.gpu_check import CheckOptions, results_table, run_checks
    from mimo_ray.perf.host import machine_info
    from mimo_ray.perf.report import write_json

    opts = CheckOptions(device=ns.device, preset=ns.preset, overrides=list(ns.overrides), steps=ns.steps,
                        repeats=ns.repeats, warmup=ns.warmup, sizes_mib=ns.sizes_mib, skip=ns.skip,
                        timeout_s=ns.timeout_s)  # fmt: skip
    machine = machine_info()
    gpu = torch.cuda.get_device_name(0) if ns.device == "cuda" else "none (--device cpu)"
    print(f"machine: {', '.join(f'{k} {v}' for k, v in machine.items())}; GPU {gpu}", flush=True)
    if ns.device == "cpu":
        torch.set_num_threads(load_config(ns.preset, list(ns.overrides)).parallel.torch_num_threads or 1)
    needs_ray = not {"disaggregated_step", "step_table", "transport_table"} <= ns.skip
    if needs_ray:
        from mimo_ray.cli.train import ensure_ray

        ensure_ray(load_config(ns.preset, list(ns.overrides)))
    init_megatron(seed=1234)
    start = time.perf_counter()
    checks, tables = run_checks(opts)
    wall = time.perf_counter() - start
    for table in tables:
        print("\n" + table.render() + "\n", flush=True)
    result = results_table(checks, f"GPU check: preset {ns.preset}, bf16, device {ns.device} ({gpu})")
    result.notes.append(f"wall time {wall:.0f} s (budget 600 s on one GPU)")
    print("\n" + result.render(), flush=True)
    out = {"machine": {**machine, "gpu": gpu}, "command": ["jobs/gpu_check.py", *(argv or sys.argv[1:])],
           "checks": result.to_dict(), "tables": {t.name: t.to_dict() for t in tables}, "wall_s": wall,
           "passed": all(c.passed for c in checks)}  # fmt: skip
    if ns.json_out:
        write_json(ns.json_out, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
