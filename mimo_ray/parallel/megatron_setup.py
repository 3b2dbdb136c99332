"""Megatron process set-up for one process: torch.distributed (gloo on CPU, nccl on GPU), model-parallel groups,
RNG, and the small CPU compatibility layer megatron-core 0.16 needs on a CUDA-less torch.

Every CPU workaround lives here and nowhere else (NOTES.md §2). They touch private Megatron names, so
:data:`PATCHED_INTERNALS` lists them and ``tests/unit/test_megatron_setup.py`` fails loudly if they move.

    device = init_megatron(tp=1, seed=1234)     # world of 1, free port, gloo on CPU
    model = build_fused_model(cfg).to(device)
    destroy_megatron()
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator

import torch

MEGATRON_VERSION = "0.16.1"

# (module, attribute) pairs the CPU layer relies on; a test asserts they still exist.
PATCHED_INTERNALS: tuple[tuple[str, str], ...] = (
    ("megatron.core.parallel_state", "_GLOBAL_MEMORY_BUFFER"),
    ("megatron.core.utils", "GlobalMemoryBuffer"),
    ("megatron.core.fusions.fused_softmax", "get_default_causal_mask"),
    ("megatron.core.models.common.embeddings.rotary_pos_embedding", "RotaryEmbedding"),
    ("megatron.core.tensor_parallel.random", "model_parallel_cuda_manual_seed"),
)

_CPU_COMPAT_APPLIED = False


#: Rendezvous ports are drawn above Ray's worker ports (10002-19999 by default) and below the kernel's ephemeral range.
_PORT_FLOOR = 20000


def _ephemeral_floor() -> int:
    """First port of the kernel's ephemeral range (outgoing connections take their local ports from it)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> int | None:
    """``port`` (0: any) if it can be bound on every local address now, else ``None``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("", port))
        except OSError:
            return None
        return sock.getsockname()[1]


def free_port() -> int:
    """A TCP port for a torch.distributed rendezvous (rank 0's TCPStore), free on every local address.

    The port is checked on all addresses (the store listens on all of them; a port free on 127.0.0.1 may be taken on
    the node's IP) and drawn outside the kernel's ephemeral range and Ray's worker ports, so that the outgoing
    connections of a busy node cannot take it between this check and the store's bind. A kernel-chosen port is the
    fallback when that window has no free port.
    """
    ceiling = _ephemeral_floor()
    draw = random.SystemRandom()
    for _ in range(64 if ceiling > _PORT_FLOOR else 0):
        port = _bindable(draw.randrange(_PORT_FLOOR, ceiling))
        if port is not None:
            return port
    port = _bindable(0)
    if port is None:
        raise OSError("no free TCP port for the torch.distributed rendezvous")
    return port


def _cpu_causal_mask(sq: int) -> torch.Tensor:
    """Upstream allocates this on "cuda"; same upper-triangular bool mask on CPU. Shape ``[sq, sq]``."""
    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


class _CpuMemoryBuffer:
    """Drop-in for ``GlobalMemoryBuffer`` that allocates on CPU instead of ``torch.cuda.current_device()``."""

    def __init__(self) -> None:
        self.buffer: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None) -> torch.Tensor:  # noqa: ANN001
        numel = 1
        for dim in tensor_shape:
            numel *= dim
        key = (name, dtype)
        if key not in self.buffer or self.buffer[key].numel() < numel:
            self.buffer[key] = torch.empty(numel, dtype=dtype)
        return self.buffer[key][:numel].view(*tensor_shape)


def apply_cpu_compat() -> None:
    """Make megatron-core 0.16 run forward/backward on a CUDA-less torch. Idempotent; no-op with CUDA."""
    global _CPU_COMPAT_APPLIED
    if _CPU_COMPAT_APPLIED or torch.cuda.is_available():
        return
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = _cpu_causal_mask
    # RoPE moves inv_freq to torch.cuda.current_device() on first use, CLIPViT calls .cuda() while building:
    # on a machine without CUDA the only device either can mean is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    _CPU_COMPAT_APPLIED = True


@contextlib.contextmanager
def building_on_cpu() -> Iterator[None]:
    """Make ``Tensor.cuda()`` a no-op while constructing modules on a CUDA-less machine (CLIPViTModel)."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.cuda = original  # type: ignore[method-assign]


def default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_megatron(
    *,
    rank: int = 0,
    world_size: int = 1,
    tp: int = 1,
    init_method: str | None = None,
    backend: str | None = None,
    seed: int = 1234,
    local_rank: int = 0,
) -> torch.device:
    """Initialise torch.distributed and Megatron's model-parallel state in this process.

    Args:
        rank: this process's rank in its own world (a stage group, never the whole job).
        world_size: processes in that world; must be a multiple of ``tp``.
        tp: tensor-parallel size; the rest of the world is data parallel.
        init_method: rendezvous URL (``tcp://host:port``); a free local port when ``None`` and world is 1.
            Never inherited from ``MASTER_PORT`` (Ray actors inherit the driver's, NOTES §2).
        backend: ``gloo`` or ``nccl``; nccl when CUDA is available.
        seed: seeds torch and Megatron's RNG tracker.
        local_rank: GPU index on this node.

    Returns:
        The device modules and tensors of this process belong on.

    Raises:
        ValueError: if ``world_size`` is not a multiple of ``tp``.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    if world_size % tp:
        raise ValueError(f"world_size={world_size} is not a multiple of tensor-parallel size tp={tp}")
    apply_cpu_compat()
    device = default_device(local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if parallel_state.model_parallel_is_initialized():
        destroy_megatron()
    if not torch.distributed.is_initialized():
        if init_method is None:
            if world_size != 1:
                raise ValueError("init_method is required when world_size > 1")
            init_method = f"tcp://127.0.0.1:{free_port()}"
        torch.distributed.init_process_group(
            backend=backend, init_method=init_method, rank=rank, world_size=world_size
        )
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if device.type == "cpu":
        parallel_state._GLOBAL_MEMORY_BUFFER = _CpuMemoryBuffer()
    seed_everything(seed)
    # On CPU the CUDA RNG tracker cannot exist; the inference tracker is a no-op fork (dropout uses torch's RNG).
    mp_random.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=device.type == "cpu", force_reset_rng=True
    )
    os.environ.setdefault("MIMO_RAY_DEVICE", device.type)
    return device


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA)."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def destroy_megatron() -> None:
    """Tear down Megatron's groups and torch.distributed so the process can initialise again."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
