"""Placement of stage groups (C4): what each group's bundles ask for, a cluster-wide resource check with a readable
"needs X, cluster has Y" error and a bounded wait, and one placement group per stage group.

    specs = group_specs(cfg)                         # [GroupSpec("encoder-shared", …), GroupSpec("lm", …)]
    wait_for_resources(specs, timeout_s=60)          # raises InsufficientResourcesError naming both sides
    pg = create_placement_group(specs[0], timeout_s=60)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from mimo_ray.config import Config

MIN_CPU = 0.001


class InsufficientResourcesError(RuntimeError):
    """The cluster cannot host the stage groups (after the bounded wait)."""


@dataclass(frozen=True)
class GroupSpec:
    """A stage group's shape: ``num_actors`` actors, one bundle each.

    Attributes:
        name: group name (``encoder-shared``, ``encoder-video``, ``lm``); actors are ``mimo/<name>/<rank>.g<gen>``.
        kind: ``encoder`` or ``lm``.
        num_actors: actors in the group.
        num_cpus: logical CPUs per actor (fractional on small boxes so Ray Data tasks still fit, NOTES §3).
        num_gpus: GPUs per actor (0 on CPU).
        resources: custom resources per actor (node-type pinning).
        modalities: encoder groups: the modalities they encode.
    """

    name: str
    kind: str
    num_actors: int
    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    modalities: tuple[str, ...] = ()

    @property
    def bundle(self) -> dict[str, float]:
        """One actor's bundle (never empty: Ray rejects empty bundles, so ``num_cpus=0`` alone reserves 0.001)."""
        bundle = {"CPU": self.num_cpus, **self.resources}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        bundle = {k: v for k, v in bundle.items() if v}
        return bundle or {"CPU": MIN_CPU}


def group_specs(cfg: Config) -> list[GroupSpec]:
    """Encoder group(s) then the LM group, from ``cfg.parallel``.

    ``parallel.encoder_groups``: ``shared`` → one group for every modality; ``per_modality`` → one group each, the
    first configured modality's group reads the data.
    """
    par = cfg.parallel
    gpus = par.gpus_per_actor if par.use_gpu else 0.0
    mods = list(cfg.model.modalities)
    if par.encoder_groups == "shared":
        layout = [("encoder-shared", tuple(mods))]
    else:
        layout = [(f"encoder-{m}", (m,)) for m in mods]
    specs = [
        GroupSpec(name, "encoder", par.encoder_dp, par.cpus_per_actor, gpus, dict(par.encoder_resources), group)
        for name, group in layout
    ]
    specs.append(GroupSpec("lm", "lm", par.lm_tp * par.lm_dp, par.cpus_per_actor, gpus, dict(par.lm_resources)))
    return specs


def decoder_spec(cfg: Config) -> GroupSpec | None:
    """The output-decoder group (one actor) when ``parallel.decoder_placement=group`` and outputs are enabled."""
    par = cfg.parallel
    if par.decoder_placement != "group" or not cfg.model.outputs.active():
        return None
    gpus = par.gpus_per_actor if par.use_gpu else 0.0
    return GroupSpec("decoders", "decoder", 1, par.cpus_per_actor, gpus, dict(par.decoder_resources))


def required_resources(specs: list[GroupSpec]) -> dict[str, float]:
    """Total of every bundle of every group."""
    total: dict[str, float] = {}
    for spec in specs:
        for key, amount in spec.bundle.items():
            total[key] = total.get(key, 0.0) + amount * spec.num_actors
    return total


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """Resources of ``need`` that ``have`` lacks, with the missing amount."""
    eps = 1e-9
    return {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + eps < v}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def describe(specs: list[GroupSpec]) -> str:
    """``encoder-shared 1 x {CPU: 0.25}, lm 2 x {CPU: 0.25}``."""
    return ", ".join(f"{s.name} {s.num_actors} x {_fmt(s.bundle)}" for s in specs)


def wait_for_resources(specs: list[GroupSpec], timeout_s: float, poll_s: float = 1.0) -> None:
    """Check that the cluster's total resources can hold all groups, waiting up to ``timeout_s`` for nodes to join.

    Raises:
        InsufficientResourcesError: "needs X, cluster has Y" with the groups and the missing amounts.
    """
    need = required_resources(specs)
    deadline = time.monotonic() + timeout_s
    while True:
        have = ray.cluster_resources()
        missing = shortfall(need, have)
        if not missing:
            return
        if time.monotonic() >= deadline:
            shown = {k: have.get(k, 0.0) for k in need}
            raise InsufficientResourcesError(
                f"mimo_ray needs {_fmt(need)} for {describe(specs)}, cluster has {_fmt(shown)} "
                f"(missing {_fmt(missing)}; waited {timeout_s:g} s, parallel.placement_timeout_s)"
            )
        time.sleep(poll_s)


def create_placement_group(spec: GroupSpec, timeout_s: float, generation: int = 0) -> PlacementGroup:
    """One placement group for a stage group (PACK: bundles on as few nodes as possible), ready or removed.

    Raises:
        InsufficientResourcesError: not ready within ``timeout_s`` (e.g. no single node has a bundle's mix).
    """
    pg = placement_group([spec.bundle] * spec.num_actors, strategy="PACK", name=f"mimo/{spec.name}.g{generation}")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise InsufficientResourcesError(
            f"placement group for {describe([spec])} not ready after {timeout_s:g} s "
            f"(parallel.placement_timeout_s); available now {_fmt(ray.available_resources())}"
        )
    return pg


def remove(pg: PlacementGroup | None) -> None:
    """Remove a placement group, ignoring one that is already gone."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - teardown must not raise
        pass
