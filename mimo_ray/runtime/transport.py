"""Embedding / gradient hand-off between stage actors (C5): one interface, chosen from placement.

- ``object_store`` (CPU, or by request): numpy payloads in Ray's object store, zero-copy on read; a consumer fetches
  from the producer's node, never through the driver (objects below Ray's 100 KiB inline limit travel inside the
  task metadata via the driver's process, which is only worth it for tiny payloads).
- ``nccl`` (actors on different GPUs): Ray Direct Transport, tensors stay on the producing GPU until the consumer's
  task pulls them over an NCCL communicator created for all stage actors (its own communicator, not
  torch.distributed, so Megatron's process groups are untouched).
- ``cuda_ipc`` (encoder and LM actors sharing one GPU): Ray Direct Transport over CUDA IPC handles, no communicator.

Direct transports move one object per call, so a stage's list of outputs is stashed in the actor and each output is
pulled by a ``take`` call (``Stage.run_stashed`` / ``Stage.take``). GPU-only paths: exercised on GPU clusters.

    name = choose_transport(cfg.parallel, encoder_locations, lm_locations)
    transport = make_transport(name); transport.setup(all_actors)
    refs = transport.call(actor, "forward_step", args, num_outputs=3, direct=range(2))
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from mimo_ray.config import ParallelConfig

OBJECT_STORE = "object_store"
NCCL = "nccl"
CUDA_IPC = "cuda_ipc"
GLOO = "gloo"


@dataclass(frozen=True)
class ActorLocation:
    """Where an actor runs: its node and the GPUs Ray gave it."""

    node_id: str
    gpu_ids: tuple[str, ...] = ()


def choose_transport(
    parallel: ParallelConfig, encoder_locations: Sequence[ActorLocation], lm_locations: Sequence[ActorLocation]
) -> str:
    """Pick the transport from where the actors landed, honouring ``parallel.transport`` when it is set.

    No GPUs → object store; every encoder and LM actor on one GPU of one node → CUDA IPC; otherwise NCCL.

    Raises:
        ValueError: a GPU transport was requested but the placement cannot use it (naming the field).
    """
    requested = parallel.transport
    locations = [*encoder_locations, *lm_locations]
    on_gpu = parallel.use_gpu and all(loc.gpu_ids for loc in locations)
    if requested == OBJECT_STORE:
        return OBJECT_STORE
    if not on_gpu:
        if requested in (NCCL, CUDA_IPC):
            raise ValueError(f"parallel.transport={requested!r} needs every stage actor on a GPU")
        return OBJECT_STORE
    shared_gpu = len({(loc.node_id, loc.gpu_ids) for loc in locations}) == 1
    if requested == CUDA_IPC and not shared_gpu:
        raise ValueError(
            "parallel.transport='cuda_ipc' needs the encoder and LM actors on one GPU "
            "(set parallel.gpus_per_actor to a fraction and a single-GPU placement)"
        )
    if requested == "auto":
        return CUDA_IPC if shared_gpu else NCCL
    return requested


class ObjectStoreTransport:
    """Outputs are the call's multiple return values, stored as numpy arrays in the object store."""

    name = OBJECT_STORE
    payload_format = "numpy"
    needs_tensor_transport = False

    def setup(self, actors: Sequence[Any]) -> None:
        """Nothing to set up."""

    def call(
        self,
        actor: Any,
        method: str,
        args: Sequence[Any],
        num_outputs: int,
        direct: Container[int] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[ray.ObjectRef]:
        """Submit the stage verb ``method(*args, **kwargs)``, which returns a list of ``num_outputs`` values.

        Returns:
            One ObjectRef per output.
        """
        call = actor.call.options(num_returns=num_outputs, name=method)
        refs = call.remote(method, *args, **(kwargs or {}))
        return [refs] if num_outputs == 1 else list(refs)

    def teardown(self) -> None:
        """Nothing to tear down."""


class DirectTransport(ObjectStoreTransport):
    """Ray Direct Transport: tensors stay on the producer until the consuming task pulls them.

    Args:
        name: ``nccl`` or ``cuda_ipc`` (GPU stage actors). ``gloo`` also works between CPU actors *without*
            Megatron (its communicator would take over their default torch.distributed group, NOTES §3), so no
            config selects it; the plumbing tests use it.
    """

    payload_format = "torch"
    needs_tensor_transport = True

    def __init__(self, name: str):
        if name not in (NCCL, CUDA_IPC, GLOO):
            raise ValueError(f"unknown direct transport {name!r}; choose nccl or cuda_ipc")
        self.name = name
        self._group = None
        self._keys = itertools.count()

    def setup(self, actors: Sequence[Any]) -> None:
        """NCCL / gloo: one communicator over every stage actor (ranks in the given order). CUDA IPC needs none."""
        if self.name in (NCCL, GLOO):
            from ray.experimental.collective import create_collective_group

            backend = "nccl" if self.name == NCCL else "torch_gloo"
            self._group = create_collective_group(list(actors), backend=backend, name=f"mimo-rdt-{id(self)}")

    def call(
        self,
        actor: Any,
        method: str,
        args: Sequence[Any],
        num_outputs: int,
        direct: Container[int] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> list[ray.ObjectRef]:
        """Run the call with its outputs stashed in the actor, then one ``take`` per output; outputs in ``direct``
        (tensor payloads on the GPU) go over the direct transport, the rest through the object store.
        """
        key = f"{method}:{next(self._keys)}"
        done = actor.run_stashed.options(name=method).remote(key, method, *args, **(kwargs or {}))
        refs = []
        for index in range(num_outputs):
            take = actor.take.options(tensor_transport=self.name) if index in direct else actor.take
            refs.append(take.remote(done, key, index))
        return refs

    def teardown(self) -> None:
        """Destroy the NCCL communicator."""
        if self._group is not None:
            from ray.experimental.collective import destroy_collective_group

            try:
                destroy_collective_group(self._group)
            except Exception:  # noqa: BLE001 - actors may already be dead
                pass
            self._group = None


def make_transport(name: str) -> ObjectStoreTransport:
    """The transport object for a chosen name."""
    return ObjectStoreTransport() if name == OBJECT_STORE else DirectTransport(name)
