"""One command, one GPU, under 10 minutes: is mimo_ray ready for GPU training and serving?

    source .gpu-deps/setup.sh && python jobs/gpu_check.py   # bench-s, bf16, SDPA (flash), CUDA IPC at 0.5 GPU/actor
    python jobs/gpu_check.py --json runs/gpu_check.json --repeats 10
    python jobs/gpu_check.py --memory-only                   # the 7B memory table alone (CPU: an estimate)
    python jobs/gpu_check.py --device cpu --preset tiny --skip step_table,transport_table   # harness smoke test

First it prints the memory each group holds per GPU for ``--memory-preset`` (avlm-7b) at ``--memory-tp`` (2):
parameters, weights, gradients, optimizer state (mimo_ray's local optimizer and Megatron's distributed one),
activations, total, and whether it fits (the GPU's measured ``torch.cuda.mem_get_info`` total; without a GPU an
estimate against an 80 GB H100). See ``mimo_ray/perf/memory.py`` for the formulas.

Checks (a PASS/FAIL table with the numbers at the end, exit status 1 if any fails):
  fused_step          bf16 fused train steps: parameters bf16 on the GPU, finite losses, step time
  kv_cache            greedy generation with Megatron's KV cache equals generation without it
  output_decoding     image and audio output decoders (incl. Griffin-Lim) run on the GPU, outputs in range
  distributed_optimizer  Megatron DDP + DistributedOptimizer (train.optimizer_impl=megatron) vs the torch optimizer:
                      tiny preset, bf16, loss/grad-norm agreement and optimizer bytes/param as predicted
  disaggregated_step  bf16 disaggregated train steps, encoder and LM actors sharing the GPU over CUDA IPC
  loss_agreement      fused vs disaggregated loss on the same batches (step 1 <= 1e-3 relative, all <= 2e-2)
  step_table          jobs/bench.py step table: step time, tokens/s, MFU against the GPU's dense bf16 spec
  transport_table     jobs/bench.py transport table: hand-off GB/s incl. RDT cuda_ipc, control latency

A fresh GPU machine has torch + CUDA but no ray / megatron-core: the script checks its imports before anything else
and says how to get them (``bash ../shared/gpu/pack.sh`` on the dev machine, carry ``.gpu-deps``, run
``source .gpu-deps/setup.sh && python jobs/gpu_check.py``); exit status 2 when something is missing. It runs from the
repository root without an installed package. Without CUDA it refuses unless ``--device cpu`` is given. Extra
``key=value`` arguments override the config (e.g. data.micro_batch_size=2).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python jobs/gpu_check.py` puts jobs/ on the path, not the repository root
    sys.path.insert(0, str(REPO))

#: Modules the full check imports (module → what provides it); the memory table needs only the first two.
REQUIRED = {"torch": "torch", "yaml": "pyyaml", "ray": "ray", "jsonschema": "jsonschema (ray's)",
            "megatron.core": "megatron-core 0.16.1"}  # fmt: skip
MEMORY_ONLY = ("torch", "yaml")


def missing_modules(names: list[str] | tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be imported here (found without importing them)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a missing parent package, or a module set to None in sys.modules
            found = False
        if not found:
            missing.append(name)
    return missing


def check_dependencies(argv: list[str]) -> None:
    """Exit with status 2 and a message saying what is missing and how to get it, before any other import.

    Raises:
        SystemExit: a required module is missing.
    """
    light = "--memory-only" in argv or "-h" in argv or "--help" in argv
    missing = missing_modules(MEMORY_ONLY if light else tuple(REQUIRED))
    if not missing:
        return
    names = ", ".join(f"{m} ({REQUIRED.get(m, m)})" for m in missing)
    print(
        f"error: jobs/gpu_check.py cannot start: missing Python modules: {names}.\n"
        "A fresh GPU machine has torch + CUDA but not ray / megatron-core. To get them:\n"
        "  1. on the dev machine, from this checkout: bash ../shared/gpu/pack.sh   (writes .gpu-deps/, ~50 MB)\n"
        "  2. carry .gpu-deps with the working tree to the GPU machine\n"
        "  3. run: source .gpu-deps/setup.sh && python jobs/gpu_check.py\n"
        "(python jobs/gpu_check.py --memory-only needs only torch and pyyaml.)",
        file=sys.stderr,
    )
    raise SystemExit(2)


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
    ap.add_argument("--memory-preset", default="avlm-7b", help="preset whose per-GPU memory is tabled first")
    ap.add_argument("--memory-tp", type=int, default=2, help="LM tensor-parallel size of the memory table")
    ap.add_argument("--memory-only", action="store_true", help="print the memory table and exit (no GPU needed)")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    ns = ap.parse_args(argv)
    bad = [o for o in ns.overrides if "=" not in o]
    if bad:
        ap.error(f"config overrides must be key=value, got {bad}")
    if ns.memory_tp < 1:
        ap.error(f"--memory-tp {ns.memory_tp} must be >= 1")
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


def memory_report(preset: str, tp: int):  # -> mimo_ray.perf.report.Table
    """The per-GPU memory table of ``preset`` at LM TP ``tp``: measured capacity on a GPU, an estimate without."""
    import torch

    from mimo_ray.config_cli import load_config
    from mimo_ray.perf.memory import memory_table

    capacity = torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    return memory_table(load_config(preset, []), tp, capacity=capacity, preset=preset)


def main(argv: list[str] | None = None) -> dict:
    """Run the checks; print the memory table, the bench tables and the pass/fail table; returns the results (also
    ``--json``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    check_dependencies(args)
    ns = parse_args(args)
    import torch

    memory = memory_report(ns.memory_preset, ns.memory_tp)
    print(memory.render() + "\n", flush=True)
    if ns.memory_only:
        out = {"tables": {memory.name: memory.to_dict()}, "passed": True}
        if ns.json_out:
            from mimo_ray.perf.report import write_json

            write_json(ns.json_out, out)
        return out
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
    out = {"machine": {**machine, "gpu": gpu}, "command": ["jobs/gpu_check.py", *args],
           "checks": result.to_dict(), "tables": {t.name: t.to_dict() for t in [memory, *tables]}, "wall_s": wall,
           "passed": all(c.passed for c in checks)}  # fmt: skip
    if ns.json_out:
        write_json(ns.json_out, out)
    return out


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
