"""jobs/gpu_check.py: argument parsing, the refusal without CUDA, the pass/fail table, and its CUDA-free checks run
on the CPU (tiny preset, bf16): fused steps, KV-cache == no-cache generation, output decoding. The Ray checks and the
bench tables are exercised by the runtime and bench tests; the real run needs a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jobs import gpu_check  # noqa: E402
from mimo_ray.perf.gpu_check import Check, CheckOptions, results_table, run_checks  # noqa: E402

RAY_CHECKS = "disaggregated_step,step_table,transport_table"


def test_arguments_and_defaults(capsys):
    ns = gpu_check.parse_args([])
    assert (ns.device, ns.preset, ns.steps, ns.sizes_mib, ns.skip) == ("cuda", "bench-s", 3, [16, 64, 256], set())
    ns = gpu_check.parse_args(["--device", "cpu", "--skip", RAY_CHECKS, "data.micro_batch_size=2"])
    assert ns.preset == "tiny" and ns.overrides == ["data.micro_batch_size=2"]
    assert ns.skip == {"disaggregated_step", "step_table", "transport_table"}
    for bad, message in [
        (["--skip", "fused_step,warp_drive"], "--skip ['warp_drive']: unknown checks"),
        (["--sizes-mib", "16,big"], "--sizes-mib '16,big' must be comma-separated integers"),
        (["--steps", "0"], "--steps 0 and --repeats 5 must be >= 1"),
        (["model.lm"], "config overrides must be key=value, got ['model.lm']"),
    ]:
        with pytest.raises(SystemExit) as err:
            gpu_check.parse_args(bad)
        assert err.value.code == 2
        assert message in capsys.readouterr().err


def test_refuses_without_cuda():
    assert not torch.cuda.is_available()  # the suite pins itself to the CPU
    with pytest.raises(SystemExit, match=r"needs a CUDA GPU and torch.cuda.is_available\(\) is False.*--device cpu"):
        gpu_check.main([])
    with pytest.raises(RuntimeError, match="the GPU check needs a CUDA device"):
        run_checks(CheckOptions(device="cuda"))


def test_results_table_marks_each_check():
    table = results_table([Check("fused_step", True, "losses 5.9", "1.0 s"), Check("kv_cache", False, "equal=False")])
    text = table.render()
    assert "| fused_step | PASS   | losses 5.9" in text and "| kv_cache   | FAIL   | equal=False" in text
    assert table.notes == ["1 of 2 checks passed"]


def test_cuda_free_checks_pass_on_cpu(megatron_world):
    small = ["data.micro_batch_size=2", "data.global_batch_size=4", "model.lm.seq_length=96"]
    opts = CheckOptions(device="cpu", preset="tiny", steps=2, skip=set(RAY_CHECKS.split(",")), overrides=small)
    checks, tables = run_checks(opts)
    print("\n" + results_table(checks).render())
    assert [c.name for c in checks] == ["fused_step", "kv_cache", "output_decoding"]
    assert all(c.passed for c in checks), [c for c in checks if not c.passed]
    assert tables == []
    assert "('cpu', 'torch.bfloat16')" in checks[0].detail


REPO = Path(__file__).resolve().parents[2]


def _run(args, timeout=120):
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the script must find mimo_ray by itself
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_memory_only_runs_as_a_plain_script_on_cpu():
    proc = _run(["jobs/gpu_check.py", "--memory-only"])
    assert proc.returncode == 0, proc.stderr
    assert "7B memory fit (arithmetic, estimate for an 80 GB H100): avlm-7b, LM TP=2" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| lm ")]
    assert len(rows) == 5 and rows[0].rstrip(" |").endswith("NO") and all(r.rstrip(" |").endswith("yes")
                                                                         for r in rows[1:])


def test_missing_modules_get_an_actionable_message_not_a_traceback():
    # A fresh GPU machine: no ray, no megatron (a module set to None in sys.modules cannot be imported or found).
    code = ("import runpy, sys; sys.modules['ray'] = None; sys.modules['megatron'] = None; "
            "sys.argv = ['jobs/gpu_check.py']; runpy.run_path('jobs/gpu_check.py', run_name='__main__')")
    proc = _run(["-c", code])
    assert proc.returncode == 2
    assert "missing Python modules: ray (ray), megatron.core (megatron-core 0.16.1)" in proc.stderr
    for step in ("bash ../shared/gpu/pack.sh", "carry .gpu-deps", "source .gpu-deps/setup.sh && python "
                 "jobs/gpu_check.py"):
        assert step in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert gpu_check.missing_modules(["torch", "yaml", "no_such_module_xyz", "no_such_pkg.sub"]) == [
        "no_such_module_xyz", "no_such_pkg.sub"]
