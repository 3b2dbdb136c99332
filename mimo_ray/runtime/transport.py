"""Embedding / gradient hand-off between stage actors (C5): one interface, chosen from placement.

- ``object_store`` (CPU, or by request): numpy payloads in Ray's object store, zero-copy on read; a consumer fetches
  from the producer's node, never through the driver (objects below Ray's 100 KiB inline limit travel inside the
  task metadata via the driver's process, which is only worth it for tiny payloads).
- ``nccl`` (actors on different GPUs): Ray Direct Transport, tensors stay on the producing GPU until the consumer's
  task pulls them over an NCCL communicator created for all stage actors (its own communicator, not
  torch.distributed, so Megatron's process groups are untouched).
- ``cuda_ipc`` (encoder and LM actors sharing one GPU): Ray Direct Transport over CUDA IPC handles, no communicator.

Direct transports move one object per call, so a stage's list of outputs is stashed in the actor and each output is
pulled by a ``take`` call (``StageActor.run_stashed`` / ``StageActor.take``). GPU-only paths: exercised on GPU clusters.

    check_transport_config(cfg)                      # before any actor starts: impossible layouts, missing cupy
    name = choose_transport(cfg.parallel, encoder_locations, lm_locations, decoder_locations)
    transport = make_transport(name); transport.setup(all_actors)
    refs = transport.call(actor, "forward_step", args, num_outputs=3, direct=range(2))
"""

from __future__ import annotations

import importlib.util
import itertools
import threading
import uuid
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import Any

import ray

from mimo_ray.config import Config, ParallelConfig

OBJECT_STORE = "object_store"
NCCL = "nccl"
CUDA_IPC = "cuda_ipc"
GLOO = "gloo"


@dataclass(frozen=True)
class ActorLocation:
    """Where an actor runs: its node and the GPUs Ray gave it."""

    node_id: str
    gpu_ids: tuple[str, ...] = ()


def stage_actor_count(cfg: Config) -> int:
    """Stage actors of the disaggregated runtime: encoder groups x encoder DP, LM TP x DP, and the decoder group."""
    par = cfg.parallel
    encoder_groups = len(cfg.model.modalities) if par.encoder_groups == "per_modality" else 1
    decoders = 1 if par.decoder_placement == "group" and cfg.model.outputs.active() else 0
    return max(encoder_groups, 1) * par.encoder_dp + par.lm_tp * par.lm_dp + decoders


def cupy_available() -> bool:
    """Whether ``cupy`` (Ray's NCCL collective backend) can be imported here."""
    return importlib.util.find_spec("cupy") is not None


def check_transport_config(cfg: Config) -> None:
    """Reject transports that cannot work, before any actor starts.

    - ``cuda_ipc`` moves tensors between actors that share one GPU, so every stage actor must fit on one GPU:
      ``parallel.encoder_dp = lm_dp = lm_tp = 1`` and ``gpus_per_actor * actors <= 1``.
    - ``nccl`` (asked for, or what ``auto`` picks when the actors cannot share one GPU) needs ``cupy``.

    Raises:
        ValueError: naming the fields at fault and what to change.
    """
    par = cfg.parallel
    if not par.use_gpu or par.transport == OBJECT_STORE:
        return
    actors = stage_actor_count(cfg)
    one_gpu = par.encoder_dp == par.lm_dp == par.lm_tp == 1 and par.gpus_per_actor * actors <= 1.0 + 1e-9
    if par.transport == CUDA_IPC and not one_gpu:
        raise ValueError(
            "parallel.transport='cuda_ipc' needs every stage actor on one GPU: parallel.encoder_dp, parallel.lm_dp "
            f"and parallel.lm_tp must be 1 (got {par.encoder_dp}, {par.lm_dp}, {par.lm_tp}) and "
            f"parallel.gpus_per_actor x {actors} actors must be <= 1 (got {par.gpus_per_actor}); use "
            "parallel.transport=nccl (or auto) across GPUs"
        )
    wants_nccl = par.transport == NCCL or (par.transport == "auto" and not one_gpu)
    if wants_nccl and not cupy_available():
        raise ValueError(
            f"parallel.transport={par.transport!r} uses NCCL between GPUs (stage actors on different GPUs), which "
            "needs cupy: pip install -e '.[gpu]' (cupy-cuda12x), or set parallel.transport=object_store"
        )


def choose_transport(
    parallel: ParallelConfig,
    encoder_locations: Sequence[ActorLocation],
    lm_locations: Sequence[ActorLocation],
    decoder_locations: Sequence[ActorLocation] = (),
) -> str:
    """Pick the transport from where the actors landed, honouring ``parallel.transport`` when it is set.

    No GPUs → object store; every encoder, LM and decoder-group actor on one GPU of one node → CUDA IPC; otherwise
    NCCL. The decoder group exchanges the generation rows and their gradients with the LM, so it counts like any
    other stage actor.

    Raises:
        ValueError: a GPU transport was requested but the placement cannot use it (naming the field).
    """
    requested = parallel.transport
    locations = [*encoder_locations, *lm_locations, *decoder_locations]
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
            "parallel.transport='cuda_ipc' needs the encoder, LM and decoder actors on one GPU "
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

    def teardown(self, timeout_s: float = 10.0) -> None:
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
        self.group_name = ""
        self._group = None
        self._keys = itertools.count()

    def setup(self, actors: Sequence[Any]) -> None:
        """NCCL / gloo: one communicator over every stage actor (ranks in the given order). CUDA IPC needs none."""
        if self.name in (NCCL, GLOO):
            from ray.experimental.collective import create_collective_group

            backend = "nccl" if self.name == NCCL else "torch_gloo"
            # A fresh name per group: a re-created runtime (recovery) never meets a stale group of the same name.
            self.group_name = f"mimo-rdt-{self.name}-{uuid.uuid4().hex[:12]}"
            self._group = create_collective_group(list(actors), backend=backend, name=self.group_name)

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

    def teardown(self, timeout_s: float = 10.0) -> None:
        """Destroy the communicator, waiting at most ``timeout_s`` (call after the actors are killed: Ray's destroy
        waits on every member with no timeout, and a member wedged in NCCL would never answer).
        """
        group, self._group = self._group, None
        if group is None:
            return

        def destroy() -> None:
            from ray.experimental.collective import destroy_collective_group

            try:
                destroy_collective_group(group)
            except Exception:  # noqa: BLE001 - members are dead by now; only the driver-side record matters
                pass

        worker = threading.Thread(target=destroy, name=f"destroy-{self.group_name}", daemon=True)
        worker.start()
        worker.join(timeout_s)


def make_transport(name: str) -> ObjectStoreTransport:
    """The transport object for a chosen name."""
    return ObjectStoreTransport() if name == OBJECT_STORE else DirectTransport(name)
