"""The ``disaggregated`` runtime: encoder group(s) and the LM group as Ray actor groups, one step per call.

A step: the driver routes samples (``routing.py``), then submits every actor call at once, chained by ObjectRefs
so that tensors flow actor → actor (``transport.py``) and never through the driver:

    encoder.forward_step(k) ─ pieces ─▶ lm.forward_backward(j) ─ grads ─▶ encoder.backward_step(k)
    every actor: reduce_grads(*lm_stats) ─ sq norms ─▶ optimizer_step(lr, clip, *sq_norms)

The driver waits once per step (bounded by ``train.step_timeout_s``) for the small stats; any actor error or death
surfaces as an exception from :meth:`train_step`. Recovery is the caller's: :meth:`close`, build anew, load.

    rt = DisaggregatedRuntime(cfg)           # placement groups, actors, Megatron worlds, transport
    out = rt.train_step(None, lr=1e-3)       # encoder ranks pull their own data
    rt.close()
"""

from __future__ import annotations

import itertools
import time
from functools import partial
from typing import Any

import ray
import torch

from mimo_ray.config import Config
from mimo_ray.runtime.actor_group import ActorGroup, get
from mimo_ray.runtime.base import Batch, check_iterators, loss_scale_metrics, summarize
from mimo_ray.runtime.demand import get_waiting_for_resources
from mimo_ray.runtime.placement import GroupSpec, decoder_spec, group_specs, release, reserve
from mimo_ray.runtime.routing import StepPlan, make_plan, submission_order
from mimo_ray.runtime.transport import OBJECT_STORE, check_transport_config, choose_transport, make_transport
from mimo_ray.stages.decoder import DecoderStage
from mimo_ray.stages.encoder import EncoderStage
from mimo_ray.stages.language import LanguageStage
from mimo_ray.stages.payload import batch_size, pack

_GENERATION = itertools.count(1)


def _encoder_kwargs(cfg: Config, model_spec: Any, spec: GroupSpec, leader: bool, rank: int) -> dict[str, Any]:
    return {
        "cfg": cfg,
        "spec": model_spec,
        "modalities": list(spec.modalities),
        "rank": rank,
        "world_size": spec.num_actors,
        "role": spec.name,
        "leader": leader,
    }


def _stage_kwargs(cfg: Config, spec: GroupSpec, rank: int, model_spec: Any = None) -> dict[str, Any]:
    kwargs = {"cfg": cfg, "rank": rank, "world_size": spec.num_actors, "role": spec.name}
    if model_spec is not None:
        kwargs["spec"] = model_spec
    return kwargs


class DisaggregatedRuntime:
    """Encoder groups + LM group on Ray (C4/C5), stepping exactly like :class:`~mimo_ray.runtime.fused.FusedRuntime`.

    Args:
        cfg: the config; ``cfg.parallel`` sets the groups, placement and transport.
        spec: the run's ``MimoModelConfig`` (``None``: built from ``cfg`` in every actor). A user's spec travels to
            the actors pickled (classes defined in the driver's ``__main__`` by value); each group builds its part.

    Raises:
        InsufficientResourcesError: the cluster cannot host the groups within ``parallel.placement_timeout_s``.
        ValueError: an impossible parallel layout or transport (naming the field).
    """

    def __init__(self, cfg: Config, spec: Any = None):
        par = cfg.parallel
        self.cfg = cfg
        self.spec = spec
        self.timeout_s = cfg.train.step_timeout_s
        self.lm_micro_batch = par.lm_micro_batch_size or cfg.data.micro_batch_size
        if cfg.data.global_batch_size % self.lm_micro_batch:
            raise ValueError(
                f"parallel.lm_micro_batch_size={self.lm_micro_batch} must divide "
                f"data.global_batch_size={cfg.data.global_batch_size}"
            )
        self.generation = next(_GENERATION)
        self.encoder_groups: list[ActorGroup] = []
        self.lm_group: ActorGroup | None = None
        self.decoder_group: ActorGroup | None = None
        self.transport = None
        check_transport_config(cfg)  # impossible cuda_ipc layouts, NCCL without cupy: fail before any actor starts
        specs = group_specs(cfg)
        dec_spec = decoder_spec(cfg)
        # Every group's placement groups at once: the autoscaler sees the whole demand; nothing starts unless all fit.
        self._pgs = reserve([*specs, *([dec_spec] if dec_spec else [])], par.placement_timeout_s, self.generation)
        try:
            self._start(specs, dec_spec)
        except BaseException:
            self.close()
            raise

    # ----- set-up -------------------------------------------------------------------------------------------------
    def _start(self, specs: list[GroupSpec], dec_spec: GroupSpec | None) -> None:
        par = self.cfg.parallel
        direct = par.use_gpu and par.transport != OBJECT_STORE
        common = {"generation": self.generation, "placement_timeout_s": par.placement_timeout_s}

        def group(spec: GroupSpec, stage_cls: type, kwargs: Any) -> ActorGroup:
            return ActorGroup(spec, stage_cls, kwargs, tensor_transport=direct, pgs=self._pgs.pop(spec.name), **common)

        for i, spec in enumerate(specs[:-1]):
            kwargs = partial(_encoder_kwargs, self.cfg, self.spec, spec, i == 0)
            self.encoder_groups.append(group(spec, EncoderStage, kwargs))
        lm_spec = specs[-1]
        lm_kwargs = partial(_stage_kwargs, self.cfg, lm_spec, model_spec=self.spec)
        self.lm_group = group(lm_spec, LanguageStage, lm_kwargs)
        if dec_spec is not None:
            self.decoder_group = group(dec_spec, DecoderStage, partial(_stage_kwargs, self.cfg, dec_spec))
        wait = par.placement_timeout_s + self.timeout_s
        enc_locations = [loc for g in self.encoder_groups for loc in g.locations(wait)]
        dec_locations = self.decoder_group.locations(wait) if self.decoder_group is not None else []
        name = choose_transport(par, enc_locations, self.lm_group.locations(wait), dec_locations)
        self.transport = make_transport(name)
        if self.transport.needs_tensor_transport and not direct:
            raise ValueError(f"transport {self.transport.name} needs actors created with Ray Direct Transport")
        infos = get([ref for g in self.groups for ref in g.setup_async(self.transport.payload_format, wait)], wait)
        self._setup_infos = infos
        lm_infos = infos[-len(self.lm_group) :]
        # LM actors by data-parallel rank, each list ordered by TP rank (TP rank 0 returns the gradients).
        self.lm_by_dp: dict[int, list[Any]] = {}
        for info, actor in sorted(zip(lm_infos, self.lm_group.actors, strict=True), key=lambda x: x[0]["tp_rank"]):
            self.lm_by_dp.setdefault(info["dp_rank"], []).append(actor)
        self.transport.setup(self.all_actors)

    @property
    def groups(self) -> list[ActorGroup]:
        """Encoder groups, then the LM group, then the decoder group (if any)."""
        tail = [g for g in (self.lm_group, self.decoder_group) if g is not None]
        return [*self.encoder_groups, *tail]

    @property
    def all_actors(self) -> list[Any]:
        """Every stage actor (the order is the order of the grad-norm contributions)."""
        return [a for g in self.groups for a in g.actors]

    def _wait(self, refs: list[ray.ObjectRef], what: str = "step") -> list[Any]:
        # Bounded by train.step_timeout_s unless the cluster still waits for resources (train.recovery_timeout_s).
        return get_waiting_for_resources(refs, self.timeout_s, self.cfg.train.recovery_timeout_s, what)

    # ----- the step -------------------------------------------------------------------------------------------------
    def _plan(self, microbatches: list[Batch] | None) -> StepPlan:
        data = self.cfg.data
        if microbatches is None:
            sizes = [data.micro_batch_size] * (data.global_batch_size // data.micro_batch_size)
        else:
            sizes = [batch_size(mb) for mb in microbatches]
        return make_plan(sizes, self.lm_micro_batch, self.cfg.parallel.encoder_dp, self.cfg.parallel.lm_dp)

    def _forward(self, plan: StepPlan, k: int, batch: Batch | None, train: bool, out: dict) -> None:
        """Encoder forward of micro-batch ``k`` in every group (the leader reads data and feeds the others)."""
        rank, ranges = plan.enc_rank[k], plan.local_ranges(k)
        num = len(ranges)
        followers = [list(g.spec.modalities) for g in self.encoder_groups[1:]]
        leader = self.encoder_groups[0].actors[rank]
        args = (k, None if batch is None else pack(batch, "numpy"), ranges, followers, train)
        refs = self.transport.call(leader, "forward_step", args, num + len(followers), direct=range(num))
        out[k, 0] = refs[:num]
        for g, group in enumerate(self.encoder_groups[1:], start=1):
            args = (k, refs[num + g - 1], ranges, [], train)
            out[k, g] = self.transport.call(group.actors[rank], "forward_step", args, num, direct=range(num))

    def _lm(self, plan: StepPlan, j: int, fwd: dict, train: bool, deps: dict) -> list[ray.ObjectRef]:
        """LM micro-batch ``j`` on every TP rank of its DP rank; returns TP rank 0's outputs."""
        num_groups = len(self.encoder_groups)
        pieces = plan.lm_pieces(j)
        payloads = [fwd[p.enc_mb, g][plan.piece_index(p)] for p in pieces for g in range(num_groups)]
        args = (j, num_groups, *payloads)
        actors = self.lm_by_dp[plan.lm_rank[j]]
        if self.decoder_group is not None:
            return self._lm_via_decoders(actors, args, 1 + len(pieces) * num_groups, train, deps)
        if not train:
            refs = [self.transport.call(a, "forward_only", args, 1)[0] for a in actors]
            deps.setdefault(None, []).extend(refs[1:])
            return refs[:1]
        num_out = 1 + len(pieces) * num_groups
        first = self.transport.call(actors[0], "forward_backward", args, num_out, direct=range(1, num_out))
        for actor in actors[1:]:
            ref = self.transport.call(actor, "forward_backward", args, 1, kwargs={"return_grads": False})[0]
            deps.setdefault(id(actor), []).append(ref)
        return first

    def _lm_via_decoders(self, actors: list[Any], args: tuple, num_out: int, train: bool, deps: dict) -> list[Any]:
        """An LM micro-batch whose decoders are their own group: LM ``forward_rows`` → decoder group → LM
        ``backward_rows`` (training), or LM ``forward_rows`` → decoder ``decode_eval`` (evaluation).
        """
        decoder, key = self.decoder_group.actors[0], args[0]
        # The rows payload (output 1) of TP rank 0 feeds the decoder group: over the direct transport on GPU.
        rows = [
            self.transport.call(a, "forward_rows", args, 2, direct=(1,) if tp == 0 else (), kwargs={"train": train})
            for tp, a in enumerate(actors)
        ]
        if not train:
            deps.setdefault(None, []).extend(refs[0] for refs in rows[1:])
            return self.transport.call(decoder, "decode_eval", (key, *rows[0]), 1)
        # Other TP ranks' forward_rows results need no watching: their backward_rows fails if the forward did.
        parts, grad_rows = self.transport.call(decoder, "decode_backward", (key, rows[0][1]), 2, direct=(1,))
        back = (key, parts, grad_rows)
        first = self.transport.call(actors[0], "backward_rows", back, num_out, direct=range(1, num_out))
        for actor in actors[1:]:
            kwargs = {"return_grads": False}
            deps.setdefault(id(actor), []).append(
                self.transport.call(actor, "backward_rows", back, 1, kwargs=kwargs)[0]
            )
        return first

    def _backward(self, plan: StepPlan, k: int, lm_out: dict, deps: dict) -> None:
        """Encoder backward of micro-batch ``k`` in every group from the gradients of its pieces."""
        num_groups = len(self.encoder_groups)
        for g, group in enumerate(self.encoder_groups):
            grads = [lm_out[p.lm_mb][1 + plan.lm_pieces(p.lm_mb).index(p) * num_groups + g] for p in plan.enc_pieces(k)]
            actor = group.actors[plan.enc_rank[k]]
            deps.setdefault(id(actor), []).append(actor.backward_step.remote(k, *grads))

    def _submit(self, microbatches: list[Batch] | None, train: bool) -> tuple[list[ray.ObjectRef], dict]:
        """Submit every micro-batch call of a step.

        Returns:
            The LM stats refs in LM micro-batch order, and per actor (``id`` of its handle) the refs of its calls
            whose results nobody consumes (backwards, non-zero TP ranks), so their errors are not lost.
        """
        plan = self._plan(microbatches)
        fwd: dict = {}
        lm_out: dict = {}
        deps: dict = {}
        for kind, index in submission_order(plan, self.cfg.parallel.prefetch_microbatches, train):
            if kind == "fwd":
                batch = None if microbatches is None else microbatches[index]
                self._forward(plan, index, batch, train, fwd)
            elif kind == "lm":
                lm_out[index] = self._lm(plan, index, fwd, train, deps)
            else:
                self._backward(plan, index, lm_out, deps)
        return [lm_out[j][0] for j in range(plan.num_lm)], deps

    def train_step(self, microbatches: list[Batch] | None, lr: float) -> dict[str, Any]:
        """One optimizer step over ``microbatches`` (``None``: the encoder ranks pull from their data streams).

        Returns:
            ``{"loss", "num_tokens", "grad_norm", "step_time_s", "sample_ids"}``; ``loss`` is the global per-token
            mean, ``sample_ids`` the ids of the samples stepped on.

        Raises:
            ray.exceptions.RayError: an actor failed (``[stage/rank]`` in the message) or died.
            ray.exceptions.GetTimeoutError: the step exceeded ``train.step_timeout_s``.
        """
        start = time.perf_counter()
        try:
            stats_refs, deps = self._submit(microbatches, train=True)
            actors = self.all_actors
            # Each actor's own unconsumed calls ride along (their None results are skipped) so that a failure there
            # fails every optimizer step instead of letting some groups step.
            sq_refs = [a.reduce_grads.remote(*stats_refs, *deps.get(id(a), [])) for a in actors]
            step_refs = [a.optimizer_step.remote(lr, self.cfg.train.grad_clip, *sq_refs) for a in actors]
            done = self._wait([*stats_refs, *step_refs])
        except BaseException:
            self._reset_after_failure()
            raise
        stats, steps = done[: len(stats_refs)], done[len(stats_refs) :]
        out = {**summarize(stats), "grad_norm": steps[0]["grad_norm"], "step_time_s": time.perf_counter() - start}
        if microbatches is None:  # the encoder ranks pulled from their data streams (rank by rank)
            out["sample_ids"] = [i for s in steps for i in s.get("sample_ids", ())]
        else:
            out["sample_ids"] = [i for mb in microbatches for i in (mb.get("ids") or ())]
        return {**out, **loss_scale_metrics(self.cfg, steps[0])}

    def _reset_after_failure(self, wait_s: float = 5.0) -> None:
        """Best effort after a failed step: live actors drop partial gradients and graphs (bounded, never raises).

        An actor stuck in a collective or dead is left to the caller's teardown.
        """
        try:
            refs = [a.reset_step.remote() for a in self.all_actors]
            ray.wait(refs, num_returns=len(refs), timeout=min(wait_s, self.timeout_s))
        except Exception:  # noqa: BLE001 - the original error is what the caller needs
            pass

    def eval_step(self, microbatches: list[Batch] | None) -> dict[str, Any]:
        """``{"loss", "num_tokens"}`` over the micro-batches (or one global batch from the streams), no gradients."""
        stats_refs, deps = self._submit(microbatches, train=False)
        others = deps.get(None, [])
        return summarize(self._wait([*stats_refs, *others])[: len(stats_refs)])

    # ----- data, checkpoints, views ---------------------------------------------------------------------------------
    def set_data_iterators(self, iterators: list) -> None:
        """Hand each encoder data-parallel rank its stream (sent to the actor; batches never pass the driver)."""
        streams = check_iterators(iterators, self.cfg.parallel.encoder_dp, picklable=True)
        leader = self.encoder_groups[0]
        self._wait(leader.execute_each_async("set_data_iterator", [(s,) for s in streams]))

    def param_counts(self) -> dict[str, int]:
        """``{"trainable_params", "frozen_params"}`` of the whole model, from every group's DP-rank-0 ranks."""
        ranks = [i for i in self._setup_infos if i["dp_rank"] == 0]
        return {k: sum(i[k] for i in ranks) for k in ("trainable_params", "frozen_params")}

    def save_checkpoint(self, path: str) -> None:
        """Every group writes ``<path>/<group>/tp<r>.pt`` (model + optimizer, DP rank 0 of each TP rank)."""
        self._wait([r for g in self.groups for r in g.execute_all_async("save", str(path))], "checkpoint save")

    def load_checkpoint(self, path: str) -> None:
        """Every rank loads its group's file for its TP rank."""
        self._wait([r for g in self.groups for r in g.execute_all_async("load", str(path))], "checkpoint load")

    def _merged(self, method: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for part in self._wait([r for g in self.groups for r in g.execute_all_async(method)]):
            out.update(part)
        return out

    def grads(self) -> dict[str, torch.Tensor]:
        """Last step's pre-clip gradients, TP-gathered, keyed like the fused model (tests; pulls to the driver)."""
        return self._merged("full_grads")

    def named_parameters_full(self) -> dict[str, torch.Tensor]:
        """Current parameters, TP-gathered, keyed like the fused model (tests; pulls to the driver)."""
        return self._merged("full_parameters")

    def close(self, destroy_timeout_s: float = 10.0) -> None:
        """Kill every actor and remove every placement group, then destroy the transport's communicator with a
        bounded wait (idempotent). Actors go first: a step wedged in a collective would block the destroy forever.
        """
        for group in self.groups:
            group.kill()
        release(getattr(self, "_pgs", {}))  # reserved for groups never created
        self._pgs = {}
        if self.transport is not None:
            self.transport.teardown(destroy_timeout_s)
            self.transport = None
        self.encoder_groups = []
        self.lm_group = None
        self.decoder_group = None

    def __enter__(self) -> DisaggregatedRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
