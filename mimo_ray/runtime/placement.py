"""Placement of stage groups (C4): what each group's bundles ask for, and their placement groups, reserved all at
once with a bounded wait and a readable "needs X, cluster has Y" error.

    specs = group_specs(cfg)                         # [GroupSpec("encoder-shared", …), GroupSpec("lm", …)]
    pgs = reserve(specs, timeout_s=60)               # {"encoder-shared": [pg], "lm": [pg_tp_group0, …]}

The placement groups exist (pending) while the wait runs, so an autoscaling cluster sees them as resource demand and
starts nodes of the pools whose custom resources they ask for (``encoder_gpu``, ``lm_gpu`` in ``ray_cluster.yaml``);
a poll of ``ray.cluster_resources()`` alone is no demand (NOTES §9). Groups whose actors must share a node (the LM's
tensor-parallel ranks) get one ``STRICT_PACK`` placement group per ``pack_size`` actors; other groups one ``PACK``
group. Removing the placement groups (teardown, or the job ending) is what lets idle nodes scale down.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from mimo_ray.capacity import cluster_capacity
from mimo_ray.config import Config

MIN_CPU = 0.001
#: How often a wait for placement logs what it still waits for.
PROGRESS_S = 15.0

log = logging.getLogger(__name__)


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
        pack_size: actors that must share one node (``STRICT_PACK``), consecutive ranks: ``parallel.lm_tp`` for the
            LM group, whose tensor-parallel groups are consecutive ranks (Megatron's order); 1 means no constraint.
    """

    name: str
    kind: str
    num_actors: int
    num_cpus: float
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    modalities: tuple[str, ...] = ()
    pack_size: int = 1

    def __post_init__(self) -> None:
        if self.pack_size < 1 or self.num_actors % self.pack_size:
            raise ValueError(f"group {self.name}: pack_size {self.pack_size} does not divide {self.num_actors} actors")

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
    lm_res = dict(par.lm_resources)
    specs.append(GroupSpec("lm", "lm", par.lm_tp * par.lm_dp, par.cpus_per_actor, gpus, lm_res, pack_size=par.lm_tp))
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


def stage_cpu_reservation(cfg: Config) -> float:
    """Logical CPUs the stage actors of this config hold (0 for the fused runtime, which runs in the driver).

    The data pipelines take this as ``reserved_cpus`` and keep it out of their decode budget.
    """
    if cfg.train.runtime != "disaggregated":
        return 0.0
    return float(required_resources(group_specs(cfg)).get("CPU", 0.0))


def shortfall(need: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    """Resources of ``need`` that ``have`` lacks, with the missing amount."""
    eps = 1e-9
    return {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) + eps < v}


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items())) + "}"


def describe(specs: list[GroupSpec]) -> str:
    """``encoder-shared 1 x {CPU: 0.25}, lm 2 x {CPU: 0.25}``."""
    return ", ".join(f"{s.name} {s.num_actors} x {_fmt(s.bundle)}" for s in specs)


def placement_layout(spec: GroupSpec) -> list[tuple[list[dict[str, float]], str]]:
    """The placement groups of a stage group as ``(bundles, strategy)``: one ``PACK`` group of every actor's bundle,
    or (``pack_size > 1``) one ``STRICT_PACK`` group per ``pack_size`` consecutive ranks.
    """
    if spec.pack_size == 1:
        return [([spec.bundle] * spec.num_actors, "PACK")]
    return [([spec.bundle] * spec.pack_size, "STRICT_PACK")] * (spec.num_actors // spec.pack_size)


def bundle_of(spec: GroupSpec, rank: int) -> tuple[int, int]:
    """``(placement group index, bundle index)`` of actor ``rank`` in :func:`placement_layout`'s groups."""
    if spec.pack_size == 1:
        return 0, rank
    return divmod(rank, spec.pack_size)


def reserve(
    specs: list[GroupSpec],
    timeout_s: float,
    generation: int = 0,
    poll_s: float = 1.0,
    capacity: dict[str, float] | None = None,
    progress_s: float = PROGRESS_S,
) -> dict[str, list[PlacementGroup]]:
    """Create every placement group of every stage group at once and wait (bounded) until all are placed.

    The pending groups are the demand an autoscaler scales up for; on failure every one of them is removed again,
    before any actor exists. While waiting it logs, every ``progress_s``, "waiting for N bundles of pool P".

    Args:
        specs: the stage groups.
        timeout_s: longest wait for all groups together (``parallel.placement_timeout_s``; a recovery waits
            ``train.recovery_timeout_s``).
        generation: suffix of the placement group names (``mimo/lm.g2``; ``mimo/lm.g2/<i>`` for several).
        poll_s: how often the wait checks readiness.
        capacity: the most of each resource the cluster can ever hold (``demand.cluster_capacity()``, from the
            autoscaler's ``max_workers``); ``None`` reads it. A demand above it fails at once, nothing is requested.
        progress_s: how often the wait logs what it still waits for.

    Returns:
        Stage group name → its placement groups, in :func:`placement_layout` order.

    Raises:
        InsufficientResourcesError: "needs X, cluster has Y", the missing amounts and the groups left unplaced with
            the resources a single node of their pool must offer; or a demand above what the autoscaler may ever
            start (naming the resource and its most).
    """
    if capacity is None:
        capacity = cluster_capacity()
    check_capacity(specs, capacity)
    pgs: dict[str, list[PlacementGroup]] = {}
    try:
        for spec in specs:
            layout = placement_layout(spec)
            name = f"mimo/{spec.name}.g{generation}"
            pgs[spec.name] = [
                placement_group(bundles, strategy=strategy, name=f"{name}/{i}" if len(layout) > 1 else name)
                for i, (bundles, strategy) in enumerate(layout)
            ]
        pending = {pg.id: (spec, pg) for spec in specs for pg in pgs[spec.name]}
        refs = {pg.ready(): key for key, (_, pg) in pending.items()}
        start = time.monotonic()
        deadline = start + timeout_s
        next_report = start + min(progress_s, 2 * poll_s)  # the first report soon: a wait is worth a line at once
        while refs:
            wait_s = max(0.0, min(poll_s, deadline - time.monotonic()))
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=wait_s)
            for ref in ready:
                pending.pop(refs.pop(ref))
            now = time.monotonic()
            if refs and now >= deadline:
                raise InsufficientResourcesError(_unplaced_message(specs, [s for s, _ in pending.values()], timeout_s))
            if refs and now >= next_report:
                log.warning("%s (%.0f of %g s)", waiting_message(list(pending.values())), now - start, timeout_s)
                next_report = now + progress_s
    except BaseException:
        release(pgs)
        raise
    return pgs


def pool_name(spec: GroupSpec) -> str:
    """The pool a group's bundles ask for: its custom resources (``lm_gpu``), or ``any node``."""
    return "/".join(sorted(spec.resources)) or "any node"


def waiting_message(pending: list[tuple[GroupSpec, PlacementGroup]]) -> str:
    """``waiting for 2 bundles of pool lm_gpu (lm), 1 bundle of pool encoder_gpu (encoder-shared)``."""
    counts: dict[tuple[str, str], int] = {}
    for spec, pg in pending:
        key = (pool_name(spec), spec.name)
        counts[key] = counts.get(key, 0) + len(pg.bundle_specs)
    parts = [f"{n} bundle{'s' if n != 1 else ''} of pool {pool} ({group})" for (pool, group), n in counts.items()]
    return "waiting for " + ", ".join(parts)


def check_capacity(specs: list[GroupSpec], capacity: dict[str, float] | None) -> None:
    """Refuse a demand above what the cluster can ever hold (``capacity``; ``None``: unknown, no check).

    Raises:
        InsufficientResourcesError: naming each resource asked for beyond its most, and the groups asking.
    """
    if not capacity:
        return
    need = required_resources(specs)
    over = {k: v for k, v in need.items() if k in capacity and v > capacity[k] + 1e-9}
    over.update({k: v for k, v in need.items() if k not in capacity and k not in ("CPU", "memory")})
    if over:
        detail = ", ".join(f"{k}: {v:g} (most {capacity.get(k, 0.0):g})" for k, v in sorted(over.items()))
        raise InsufficientResourcesError(
            f"mimo_ray needs {_fmt(need)} for {describe(specs)}, more than the cluster can ever hold: {detail} "
            "(the autoscaler config's max_workers x each node type's resources); lower parallel.encoder_dp / "
            "lm_dp / lm_tp or raise max_workers in ray_cluster.yaml"
        )


def _unplaced_message(specs: list[GroupSpec], unplaced: list[GroupSpec], timeout_s: float) -> str:
    need = required_resources(specs)
    have = ray.cluster_resources()
    missing = shortfall(need, have)
    shown = {k: have.get(k, 0.0) for k in need}
    waiting = []
    for spec in {s.name: s for s in unplaced}.values():
        pools = sorted(spec.resources) or ["any node"]
        node = required_resources([GroupSpec(spec.name, spec.kind, spec.pack_size, spec.num_cpus, spec.num_gpus,
                                             spec.resources)])  # fmt: skip
        waiting.append(f"{spec.name} on {'/'.join(pools)} (one node with {_fmt(node)})")
    return (
        f"mimo_ray needs {_fmt(need)} for {describe(specs)}, cluster has {_fmt(shown)} "
        f"(missing {_fmt(missing)}; not placed: {', '.join(waiting)}; waited {timeout_s:g} s, "
        "parallel.placement_timeout_s)"
    )


def release(pgs: dict[str, list[PlacementGroup]]) -> None:
    """Remove every placement group of :func:`reserve`'s result (ignoring ones already gone)."""
    for group in pgs.values():
        for pg in group:
            remove(pg)


def remove(pg: PlacementGroup | None) -> None:
    """Remove a placement group, ignoring one that is already gone."""
    if pg is None:
        return
    try:
        remove_placement_group(pg)
    except Exception:  # noqa: BLE001 - teardown must not raise
        pass
