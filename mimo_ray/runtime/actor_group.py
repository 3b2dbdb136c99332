"""A stage group (C4): N actors of one stage class in their own placement group(s), named for the Ray dashboard
(``mimo/<group>/<rank>.g<generation>``), each group its own torch.distributed world (rank 0's node hosts the
rendezvous). Stage classes stay plain Python; this module is the only place they become Ray actors.

    group = ActorGroup(spec, LanguageStage, lambda r: {"cfg": cfg, "rank": r, "world_size": 2}, generation=1)
    infos = ray.get(group.setup_async("numpy", timeout_s=300))   # Megatron initialised inside the group
    refs = group.execute_all_async("save", "/ckpt/step_10")
    group.kill()
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from mimo_ray.runtime.placement import GroupSpec, bundle_of, release, reserve
from mimo_ray.runtime.stage_actor import actor_class
from mimo_ray.runtime.transport import ActorLocation


def _location(_stage: Any) -> tuple[str, tuple[str, ...]]:
    """Runs inside an actor: its node id and GPU ids."""
    ctx = ray.get_runtime_context()
    return ctx.get_node_id(), tuple(str(g) for g in ray.get_gpu_ids())


def _rendezvous_address(_stage: Any) -> str:
    """Runs inside rank 0: a ``tcp://ip:port`` with a free port on that node."""
    from mimo_ray.parallel.megatron_setup import free_port

    return f"tcp://{ray.util.get_node_ip_address()}:{free_port()}"


def get(refs: ray.ObjectRef | list[ray.ObjectRef], timeout_s: float) -> Any:
    """``ray.get`` that is bounded (NOTES §3) and fails fast: the first failed result raises at once, even while
    other results are still pending (e.g. an actor blocked in a collective with a peer that died).

    Raises:
        ray.exceptions.GetTimeoutError: not all results arrived within ``timeout_s``.
        ray.exceptions.RayError: the first failure among the results.
    """
    if isinstance(refs, ray.ObjectRef):
        return get([refs], timeout_s)[0]
    deadline = time.monotonic() + timeout_s
    pending = list(refs)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ray.exceptions.GetTimeoutError(
                f"{len(pending)} of {len(refs)} actor results not ready after {timeout_s:g} s"
            )
        ready, pending = ray.wait(pending, num_returns=1, timeout=remaining)
        ray.get(ready, timeout=remaining)  # raises the failure of a finished task now
    return ray.get(list(refs), timeout=max(deadline - time.monotonic(), 1.0))


class ActorGroup:
    """N actors of ``stage_cls``, one per bundle of the group's placement groups (:func:`placement.reserve`).

    Args:
        spec: the group's shape and resources.
        stage_cls: a plain-Python stage class (``EncoderStage``, ``LanguageStage``).
        stage_kwargs: rank → constructor keyword arguments.
        generation: version suffix of the actor names (re-creating a killed actor's name races, NOTES §6).
        placement_timeout_s: bounded wait for the placement group.
        tensor_transport: create the actors with Ray Direct Transport enabled (GPU transports).
        pgs: the group's placement groups, already reserved (they become this group's: :meth:`kill` removes them);
            ``None`` reserves them here.
    """

    def __init__(
        self,
        spec: GroupSpec,
        stage_cls: type,
        stage_kwargs: Callable[[int], dict[str, Any]],
        *,
        generation: int,
        placement_timeout_s: float,
        tensor_transport: bool = False,
        pgs: list[PlacementGroup] | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.pgs = pgs if pgs is not None else reserve([spec], placement_timeout_s, generation)[spec.name]
        actor_cls = actor_class(stage_cls)
        remote_cls = ray.remote(enable_tensor_transport=True)(actor_cls) if tensor_transport else ray.remote(actor_cls)
        self.actors = []
        try:
            for rank in range(spec.num_actors):
                pg_index, bundle = bundle_of(spec, rank)
                options = {
                    "name": f"mimo/{spec.name}/{rank}.g{generation}",
                    "num_cpus": spec.bundle.get("CPU", 0.0),
                    "num_gpus": spec.num_gpus,
                    "resources": dict(spec.resources),
                    "max_restarts": 0,
                    "scheduling_strategy": PlacementGroupSchedulingStrategy(
                        placement_group=self.pgs[pg_index], placement_group_bundle_index=bundle
                    ),
                }
                self.actors.append(remote_cls.options(**options).remote(**stage_kwargs(rank)))
        except Exception:
            self.kill()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def locations(self, timeout_s: float) -> list[ActorLocation]:
        """Node and GPUs of every actor (waits for the actors to start)."""
        found = get([a.__ray_call__.remote(_location) for a in self.actors], timeout_s)
        return [ActorLocation(node, gpus) for node, gpus in found]

    def setup_async(self, payload_format: str, timeout_s: float) -> list[ray.ObjectRef]:
        """Form the group's torch.distributed world (rendezvous on rank 0's node) and build every stage.

        Returns:
            Refs to each rank's ``Stage.setup`` result (``rank``, ``dp_rank``, ``tp_rank``, ``num_params``); all
            ranks must run concurrently, so wait for them together.
        """
        address = get(self.actors[0].__ray_call__.remote(_rendezvous_address), timeout_s)
        return self.execute_all_async("setup", address, payload_format)

    def execute_all_async(self, method: str, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """The same call on every actor."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def execute_each_async(self, method: str, args_per_rank: Sequence[Sequence[Any]]) -> list[ray.ObjectRef]:
        """Rank ``r`` gets ``args_per_rank[r]``."""
        if len(args_per_rank) != len(self.actors):
            raise ValueError(f"{self.name}: {len(args_per_rank)} argument lists for {len(self.actors)} actors")
        return [getattr(a, method).remote(*args) for a, args in zip(self.actors, args_per_rank, strict=True)]

    def kill(self) -> None:
        """Kill every actor and remove the placement groups (safe to call twice)."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        # ray.kill returns before the GCS marks the actor dead: wait (bounded) until a call on each one fails, so
        # that its name is free and nothing of this group still runs when kill() returns.
        deadline = time.monotonic() + 15.0
        for actor in self.actors:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - RayActorError: dead, as wanted; a timeout: give up waiting
                pass
        self.actors = []
        release({self.name: self.pgs})
        self.pgs = []
