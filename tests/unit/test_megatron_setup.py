import importlib

import megatron.core
import torch

from mimo_ray.parallel import megatron_setup


def test_pinned_megatron_version():
    assert megatron.core.__version__ == megatron_setup.MEGATRON_VERSION


def test_patched_internals_still_exist():
    # The CPU layer replaces these private names; if an upgrade moves them, fail here, not deep in a forward.
    for module, attr in megatron_setup.PATCHED_INTERNALS:
        assert hasattr(importlib.import_module(module), attr), f"{module}.{attr} moved"
    import inspect

    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel

    assert "torch.cuda.current_device()" in inspect.getsource(RotaryEmbedding.get_emb)
    assert ".cuda()" in inspect.getsource(CLIPViTModel.__init__)


def test_cpu_world_is_initialised(megatron_world):
    from megatron.core import parallel_state

    assert megatron_world == torch.device("cpu") or torch.cuda.is_available()
    assert parallel_state.get_tensor_model_parallel_world_size() == 1
    assert torch.distributed.get_backend() in ("gloo", "nccl")
    if not torch.cuda.is_available():
        buf = parallel_state.get_global_memory_buffer().get_tensor((2, 3), torch.float32, "t")
        assert buf.device.type == "cpu" and buf.shape == (2, 3)
        from megatron.core.fusions import fused_softmax

        mask = fused_softmax.get_default_causal_mask(3)
        assert mask.tolist() == [[False, True, True], [False, False, True], [False, False, False]]


def test_world_size_must_divide_tp():
    import pytest

    with pytest.raises(ValueError, match="world_size=3 is not a multiple of tensor-parallel size tp=2"):
        megatron_setup.init_megatron(world_size=3, tp=2)


def test_free_port_is_free_on_every_address_and_outside_the_ephemeral_range(monkeypatch):
    import socket

    floor = megatron_setup._ephemeral_floor()
    ports = {megatron_setup.free_port() for _ in range(20)}
    assert all(20000 <= p < floor for p in ports), ports
    for port in list(ports)[:5]:  # bindable on all addresses, as the TCPStore binds it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", port))
    # A port held on some address is never handed out.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        assert megatron_setup._bindable(held.getsockname()[1]) is None
    # No room below the ephemeral range: the kernel picks.
    monkeypatch.setattr(megatron_setup, "_ephemeral_floor", lambda: 20000)
    assert megatron_setup.free_port() > 0
