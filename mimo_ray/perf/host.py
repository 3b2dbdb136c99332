"""In-process probes of the machine: dense GEMM throughput (the MFU peak) and a same-size tensor copy (the
bandwidth baseline of the transport benchmark). Pure torch, no Ray.

    tflops = gemm_tflops("fp32", n=1024)            # best of a few 1024^3 matmuls, this process's threads
    peak, source = default_peak_tflops("bf16")       # 989 on an H100, else a probe
    t = copy_timing(64 << 20, repeats=10, warmup=1)  # 64 MiB copy_ into a preallocated tensor
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mimo_ray.perf.timing import Timing, time_calls

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Dense bf16/fp16 tensor-core peak of an H100 SXM (no sparsity), TFLOP/s.
H100_DENSE_BF16_TFLOPS = 989.0
#: Dense bf16/fp16 tensor-core peaks (no sparsity, SXM parts), TFLOP/s, by a substring of the CUDA device name.
DENSE_BF16_SPEC_TFLOPS = {"H200": 989.0, "H100": H100_DENSE_BF16_TFLOPS, "A100": 312.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def num_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` torch intra-op threads (``None``: leave as is), restoring the old count."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def gemm_tflops(
    dtype: str = "fp32", n: int = 1024, repeats: int = 5, device: str = "cpu", threads: int | None = None
) -> float:
    """Best-of-``repeats`` throughput of an ``n x n x n`` matmul (``2*n^3`` FLOPs), in TFLOP/s.

    Args:
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        n: matrix side.
        repeats: timed matmuls after one warm-up.
        device: ``cpu`` or ``cuda``.
        threads: torch intra-op threads for the probe (``None``: the process's current setting).

    Returns:
        The fastest observed rate (a peak, not a typical rate).
    """
    dev = torch.device(device)
    with num_threads(threads):
        a = torch.randn(n, n, device=dev).to(DTYPES[dtype])
        b = torch.randn(n, n, device=dev).to(DTYPES[dtype])
        torch.matmul(a, b)
        _sync(dev)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b)
            _sync(dev)
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e12


def spec_peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense (no sparsity) bf16/fp16 tensor-core peak of a known GPU, from its name; ``None`` when unknown.

    Args:
        device_name: ``torch.cuda.get_device_name()``, e.g. ``NVIDIA H100 80GB HBM3``.
        dtype: ``bf16``, ``fp16`` or ``fp32`` (no spec for fp32: ``None``).
    """
    if dtype not in ("bf16", "fp16"):
        return None
    upper = device_name.upper()
    for key, value in DENSE_BF16_SPEC_TFLOPS.items():
        if key in upper:
            return value
    return None


def default_peak_tflops(dtype: str, threads: int | None = None) -> tuple[float, str]:
    """The MFU denominator when ``--peak-tflops`` is not given.

    Returns:
        ``(TFLOP/s, how it was obtained)``: the GPU's dense bf16/fp16 spec (:data:`DENSE_BF16_SPEC_TFLOPS`: H100 989,
        H200 989, A100 312) with bf16/fp16 weights, otherwise a measured GEMM probe on this machine (GPU 0, or the
        CPU with ``threads`` threads).
    """
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        spec = spec_peak_tflops(name, dtype)
        if spec is not None:
            return spec, f"dense {dtype} spec of {name}: {spec:g} TFLOP/s"
        return gemm_tflops(dtype, n=8192, device="cuda"), f"measured {dtype} 8192^3 GEMM on {name}"
    value = gemm_tflops(dtype, n=1024, repeats=10, threads=threads)
    shown = threads or torch.get_num_threads()
    return value, f"measured {dtype} 1024^3 torch.matmul on this CPU, {shown} threads"


def copy_timing(
    nbytes: int, repeats: int, warmup: int, device: str = "cpu", threads: int | None = None, fresh: bool = False
) -> Timing:
    """Time a same-size tensor copy: ``dst.copy_(src)`` into a preallocated buffer (memcpy bandwidth), or
    ``src.clone()`` into a fresh allocation (``fresh=True``; on the host that also pays the page faults of new
    memory).

    Args:
        nbytes: payload size in bytes (a multiple of 4).
        repeats: timed copies.
        warmup: untimed copies first.
        device: ``cpu`` (host) or ``cuda`` (device-to-device).
        threads: torch intra-op threads for a host copy (``None``: the process's current setting).
        fresh: clone into a new tensor each call instead of copying into one buffer.
    """
    dev = torch.device(device)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.zeros_like(src)

    def once() -> None:
        if fresh:
            src.clone()
        else:
            dst.copy_(src)
        _sync(dev)

    with num_threads(threads if dev.type == "cpu" else None):
        return time_calls(once, repeats, warmup)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU and library versions of this machine (for the report header)."""
    import platform
    from importlib import metadata

    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or platform.machine()
    mem_gib = float("nan")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / (1 << 20)
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(mem_gib, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": version("ray"),
        "megatron-core": version("megatron-core"),
        "decord": version("decord"),
        "av": version("av"),
        "video_backend": _video_backend(),
    }


def _video_backend() -> str:
    """The video decoder this process uses (``MIMO_VIDEO_BACKEND``), or why none can be used."""
    from mimo_ray.data.video_backend import resolve_video_backend

    try:
        return resolve_video_backend()
    except (ValueError, RuntimeError) as exc:
        return f"error: {exc}"
