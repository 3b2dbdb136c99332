"""megatron-core's fusion kernels are torch.compile'd at import; mimo_ray defers that to their first call
(mimo_ray/_lazy_compile.py), which keeps ~1.5 s of torch._dynamo/_inductor import out of every stage process."""

import os
import subprocess
import sys

CODE = """
import sys
import mimo_ray.model  # imports megatron.core (through megatron.core.models.mimo)
import torch
import megatron.core.jit as jit
from mimo_ray import _lazy_compile

print(int("torch._dynamo" in sys.modules), int("torch._inductor" in sys.modules))
print(int(torch.compile.__module__ == "torch"), int(any(isinstance(f, _lazy_compile._MegatronFinder)
                                                        for f in sys.meta_path)))
print(jit.jit_fuser.__qualname__)
"""


def _run(code: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True,
                         env={**os.environ, **env})  # fmt: skip
    return out.stdout.split("\n")


def test_megatron_imports_without_torch_compile_machinery_and_restores_torch_compile():
    lines = _run(CODE)
    assert lines[0] == "0 0"  # neither torch._dynamo nor torch._inductor was imported
    assert lines[1] == "1 0"  # torch.compile is the real one again; the one-shot hook is gone
    assert lines[2] == "_lazy_compile.<locals>.compile_later"  # megatron's jit_fuser decorates lazily


def test_a_lazily_compiled_function_compiles_on_first_call_with_the_same_arguments():
    import torch

    from mimo_ray._lazy_compile import _lazy_compile

    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return lambda *a, **k: fn(*a, **k) * 2

    lazy = _lazy_compile(fake_compile)

    @lazy(dynamic=False)
    def square(x):
        return x * x

    assert calls == [] and square.__name__ == "square"
    assert square(torch.tensor(3.0)).item() == 18.0 and square(torch.tensor(2.0)).item() == 8.0
    assert calls == [{"dynamic": False}]  # compiled once, on the first call, with the decorator's arguments
    assert lazy(lambda x: x + 1)(1) == 4 and len(calls) == 2  # undecorated form: torch.compile(fn)


def test_megatron_fusion_kernels_still_go_through_torch_compile_and_match_eager():
    # TORCH_COMPILE_DISABLE: the real torch.compile runs (dynamo is imported) but executes eagerly, so the test needs
    # no C++ compiler for inductor.
    code = """
import sys, torch, mimo_ray.model
from megatron.core.fusions.fused_bias_geglu import geglu
x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
y1, y2 = torch.chunk(x, 2, -1)
ref = (y1 * 0.5 * (1.0 + torch.tanh(0.79788456 * y1 * (1 + 0.044715 * y1 * y1)))) * y2
before = "torch._dynamo" in sys.modules
print(before, float((geglu(x) - ref).abs().max()) < 1e-6, "torch._dynamo" in sys.modules)
"""
    assert _run(code, TORCH_COMPILE_DISABLE="1")[0] == "False True True"
