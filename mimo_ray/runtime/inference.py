"""Inference runtimes: the encoder group forward-only and the LM group generating with a KV cache (disaggregated),
or both in the driver process (fused). Encoder ranks read their prompt streams themselves; the driver only routes
ObjectRefs and collects the small per-sample results.

    rt = build_infer_runtime(cfg, ckpt_dir)
    for rows in rt.run(streams, params):   # one dict per prompt batch: ids, tokens, counts
        ...
    rt.close()
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

from mimo_ray.config import Config
from mimo_ray.runtime.actor_group import ActorGroup, get
from mimo_ray.runtime.placement import group_specs, release, reserve
from mimo_ray.stages.inference import EncoderInferStage, FusedInferStage, LanguageInferStage

_GENERATION = itertools.count(1000)


class FusedInferRuntime:
    """The whole model in this process (also the one-process baseline of the inference benchmark)."""

    def __init__(self, cfg: Config, ckpt: str | None, spec: Any = None):
        self.cfg = cfg
        self.stage = FusedInferStage(cfg, spec)
        self.stage.setup()
        if ckpt is not None:
            self.stage.load_weights(ckpt)
        self.num_streams = 1

    def run(self, streams: list[Iterable], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Generate for every prompt batch of every stream, in stream order."""
        for stream in streams:
            for batch in stream:
                yield self.stage.generate_batch(batch, params)

    def decode_outputs(self, batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """Output tasks: decoded media per ``input_ids [B, S]`` batch, in order."""
        for input_ids in batches:
            yield self.stage.decode_outputs(input_ids)

    def close(self) -> None:
        """Nothing held outside this process."""


class DisaggregatedInferRuntime:
    """One shared encoder group (``parallel.encoder_dp`` ranks) and the LM group (``lm_tp x lm_dp``) on Ray.

    Args:
        cfg: the config (its ``parallel`` section places the groups).
        ckpt: a complete checkpoint directory, or ``None`` for the initial weights.
        in_flight: prompt batches in flight per encoder rank (overlaps encoding with generation).
    """

    def __init__(self, cfg: Config, ckpt: str | None, in_flight: int = 2, spec: Any = None):
        # Inference always uses one shared encoder group: it keeps every prompt batch on one encoder rank.
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, encoder_groups="shared"))
        self.cfg = cfg
        self.timeout_s = cfg.train.step_timeout_s
        self.in_flight = in_flight
        specs = group_specs(cfg)
        par = cfg.parallel
        gen = next(_GENERATION)
        self._pgs = pgs = reserve(specs, par.placement_timeout_s, gen)
        common = {"generation": gen, "placement_timeout_s": par.placement_timeout_s}
        enc_spec, lm_spec = specs[0], specs[-1]
        self.groups: list[ActorGroup] = []
        try:
            self.encoder = ActorGroup(
                enc_spec,
                EncoderInferStage,
                lambda r: {"cfg": cfg, "modalities": list(enc_spec.modalities), "rank": r,
                           "world_size": enc_spec.num_actors, "role": enc_spec.name, "leader": True, "spec": spec},
                pgs=pgs.pop(enc_spec.name),
                **common,
            )
            self.groups.append(self.encoder)
            self.lm = ActorGroup(
                lm_spec,
                LanguageInferStage,
                partial(lambda g, r: {"cfg": cfg, "rank": r, "world_size": g.num_actors, "role": g.name, "spec": spec},
                        lm_spec),
                pgs=pgs.pop(lm_spec.name),
                **common,
            )
            self.groups.append(self.lm)
            wait = par.placement_timeout_s + self.timeout_s
            infos = get([ref for g in self.groups for ref in g.setup_async("numpy", wait)], wait)
            lm_infos = infos[len(self.encoder) :]
            self.lm_by_dp: dict[int, list[Any]] = {}
            pairs = sorted(zip(lm_infos, self.lm.actors, strict=True), key=lambda x: x[0]["tp_rank"])
            for info, actor in pairs:
                self.lm_by_dp.setdefault(info["dp_rank"], []).append(actor)
            if ckpt is not None:
                get([r for g in self.groups for r in g.execute_all_async("load_weights", ckpt)], wait)
        except BaseException:
            self.close()
            raise
        self.num_streams = len(self.encoder)

    def run(self, streams: list[Iterable], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Generate for every prompt batch; stream ``r`` is read by encoder rank ``r``.

        Yields:
            One result per prompt batch (``ids``, ``tokens``, counts), in completion order per encoder rank.
        """
        import ray

        if len(streams) != len(self.encoder):
            raise ValueError(f"{len(streams)} prompt streams for parallel.encoder_dp={len(self.encoder)} ranks")
        get(self.encoder.execute_each_async("set_data_iterator", [[s] for s in streams]), self.timeout_s)
        dp_cycle = itertools.cycle(sorted(self.lm_by_dp))
        pending: list[tuple[int, ray.ObjectRef]] = []
        live = set(range(len(self.encoder)))

        def submit(rank: int) -> None:
            encoded = self.encoder.actors[rank].encode_next.remote()
            lm_ranks = self.lm_by_dp[next(dp_cycle)]
            refs = [actor.generate.remote(encoded, params) for actor in lm_ranks]
            pending.append((rank, refs[0]))

        for rank in sorted(live):
            for _ in range(self.in_flight):
                submit(rank)
        while pending:
            rank, ref = pending.pop(0)
            result = get(ref, self.timeout_s)
            if result is None:
                live.discard(rank)
                continue
            if rank in live:
                submit(rank)
            yield result

    def decode_outputs(self, batches: Iterable[Any]) -> Iterator[dict[str, Any]]:
        """Output tasks (no input media, so the encoder group idles): each ``input_ids [B, S]`` batch goes to every
        TP rank of one LM DP rank, round-robin, ``in_flight`` per DP rank; decoded media come back in order.
        """
        dp_cycle = itertools.cycle(sorted(self.lm_by_dp))
        pending: list[Any] = []
        window = self.in_flight * len(self.lm_by_dp)
        for input_ids in batches:
            refs = [actor.decode_outputs.remote(input_ids) for actor in self.lm_by_dp[next(dp_cycle)]]
            pending.append(refs)
            if len(pending) >= window:
                yield get(pending.pop(0), self.timeout_s)[0]  # every TP rank's, so none fails unseen
        while pending:
            yield get(pending.pop(0), self.timeout_s)[0]

    def close(self) -> None:
        """Kill the actors and free their placement groups."""
        for group in getattr(self, "groups", []):
            group.kill()
        release(getattr(self, "_pgs", {}))  # reserved for groups never created
        self._pgs = {}
        self.groups = []


def build_infer_runtime(
    cfg: Config, ckpt: str | None, spec: Any = None
) -> FusedInferRuntime | DisaggregatedInferRuntime:
    """The inference runtime ``cfg.train.runtime`` names over ``spec`` (``None``: built from ``cfg``), with the
    checkpoint's weights loaded.
    """
    if cfg.train.runtime == "fused":
        return FusedInferRuntime(cfg, ckpt, spec=spec)
    return DisaggregatedInferRuntime(cfg, ckpt, spec=spec)
