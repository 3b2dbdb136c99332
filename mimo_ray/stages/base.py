"""The part every stage shares: process set-up (Megatron in the stage's own world), gradient bookkeeping across
micro-batches, the data-parallel reduction, the optimizer step with a global clip, TP-gathered views for tests, and
per-rank checkpoints. Plain Python: Ray wraps subclasses in ``mimo_ray/runtime/actor_group.py`` (with the calling
conventions of ``mimo_ray/runtime/stage_actor.py``); tests drive them in-process.

Verbs in a step: ``(forward…/backward…)* → reduce_grads(*lm_stats) → optimizer_step(lr, clip, *sq_norms)``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from mimo_ray.config import Config
from mimo_ray.model.freeze import freeze_parts
from mimo_ray.parallel.imported_layout import is_imported, load_imported
from mimo_ray.parallel.layer_layout import match_module, rename_all
from mimo_ray.parallel.megatron_setup import init_megatron, seed_everything
from mimo_ray.parallel.tp_shards import unshard
from mimo_ray.stages.megatron_optim import resolve_impl
from mimo_ray.stages.optim import (
    clip_coefficient,
    divide_grads,
    grad_sq_norm,
    is_tp_sharded,
    param_grad,
    set_lr,
    total_norm,
)
from mimo_ray.stages.precision import DynamicLossScaler, MixedPrecisionOptimizer, cast_module, compute_dtype

F = TypeVar("F", bound=Callable[..., Any])
# Exception types that keep their type when prefixed; anything else becomes a RuntimeError.
_KEEP_TYPES = (ValueError, TypeError, KeyError, IndexError, RuntimeError, StopIteration)


def stage_call(fn: F) -> F:
    """Prefix any error raised by a stage verb with ``[role/rank]`` so the driver knows where it happened."""

    @functools.wraps(fn)
    def wrapper(self: Stage, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except Exception as err:
            if str(err).startswith(f"[{self.tag}]"):
                raise
            kind = type(err) if type(err) in _KEEP_TYPES else RuntimeError
            if kind is StopIteration:  # would be swallowed by generators and Ray's iteration machinery
                kind = RuntimeError
            raise kind(f"[{self.tag}] {type(err).__name__}: {err}") from err

    return wrapper  # type: ignore[return-value]


def ensure_megatron(*, rank: int, world_size: int, tp: int, init_method: str | None, seed: int) -> torch.device:
    """Initialise Megatron for this stage's world, reusing an identical world-1 set-up already in the process."""
    from megatron.core import parallel_state

    if (
        world_size == 1
        and tp == 1
        and parallel_state.model_parallel_is_initialized()
        and dist.is_initialized()
        and dist.get_world_size() == 1
    ):
        seed_everything(seed)
        return torch.device(os.environ.get("MIMO_RAY_DEVICE", "cpu"))
    return init_megatron(rank=rank, world_size=world_size, tp=tp, init_method=init_method, seed=seed)


class Stage:
    """Base of the encoder, language-model and fused stages.

    Args:
        cfg: the whole config.
        role: group name shown in errors and used as the checkpoint folder (``encoder-video``, ``lm``, ``fused``).
        rank: rank inside the stage's own torch.distributed world.
        world_size: actors in the stage's group.
        tp: tensor-parallel size inside the group (LM only; 1 elsewhere).
        name_prefix: prefix that maps this stage's parameter names onto the fused model's.
        spec: the run's Megatron ``MimoModelConfig`` (a user's ModuleSpecs); ``None``: built from ``cfg``
            (:func:`mimo_ray.model.build_mimo_config`). Each stage builds only its part of it.
    """

    #: Whether the stage trains: inference stages set ``False`` and get no optimizer (no fp32 master copies).
    trains = True

    def __init__(
        self,
        cfg: Config,
        *,
        role: str,
        rank: int,
        world_size: int,
        tp: int = 1,
        name_prefix: str = "",
        spec: Any = None,
    ):
        self.cfg = cfg
        self.spec = spec
        self.role = role
        self.rank = rank
        self.world_size = world_size
        self.tp = tp
        self.name_prefix = name_prefix
        self.tag = f"{role}/{rank}"
        self.payload_format = "numpy"
        self.device = torch.device("cpu")
        self.module: torch.nn.Module | None = None
        # MixedPrecisionOptimizer ("torch") or, on CUDA, Megatron's DistributedAdam ("megatron"): train.optimizer_impl.
        self.optimizer: Any = None
        self.optimizer_impl = "torch"
        self.dtype = compute_dtype(cfg)
        # fp16 only: the dynamic loss scale (identical on every stage: all see the same global grad norms).
        self.scaler: DynamicLossScaler | None = None
        if self.dtype == torch.float16:
            self.scaler = DynamicLossScaler(cfg.train.initial_loss_scale, cfg.train.loss_scale_window)
        self.tp_rank = 0
        self.dp_rank = 0
        self._in_step = False
        self._last_grads: dict[str, torch.Tensor] = {}

    # ----- set-up -------------------------------------------------------------------------------------------------
    def build_module(self) -> torch.nn.Module:
        """The stage's model part; every concrete stage (encoder, LM, fused) overrides this."""
        raise TypeError(f"{type(self).__name__} does not define build_module()")

    @stage_call
    def setup(self, init_method: str | None = None, payload_format: str = "numpy") -> dict[str, Any]:
        """Join the stage's world, initialise Megatron in it, build the model part and its optimizer.

        Args:
            init_method: ``tcp://host:port`` of rank 0 (``None``: a free local port, world of 1 only).
            payload_format: ``numpy`` (object store) or ``torch`` (Ray Direct Transport), see ``payload.py``.

        Returns:
            ``{"rank", "dp_rank", "tp_rank", "num_params", "trainable_params", "frozen_params"}`` (this rank's).
        """
        from megatron.core import parallel_state

        threads = self.cfg.parallel.torch_num_threads
        if threads:
            torch.set_num_threads(threads)
        self.payload_format = payload_format
        self.device = ensure_megatron(
            rank=self.rank, world_size=self.world_size, tp=self.tp, init_method=init_method, seed=self.cfg.train.seed
        )
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.module = cast_module(self.build_module(), self.dtype).to(self.device)
        freeze_parts(self.module, self.cfg.model, self.name_prefix)
        # Each element of the full model counted once: TP shards on every TP rank, replicated tensors on TP rank 0.
        counts = {"trainable": 0, "frozen": 0}
        for p in self.module.parameters():
            if is_tp_sharded(p) or self.tp_rank == 0:
                counts["trainable" if p.requires_grad else "frozen"] += p.numel()
        # An encoder group with no input modality (output tasks only), or whose parts are all frozen, has no
        # trainable parameters, hence no optimizer (and no optimizer state): it still encodes and routes the data.
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = self._build_optimizer(params) if params and self.trains else None
        num = sum(p.numel() for p in self.module.parameters())
        return {"rank": self.rank, "dp_rank": self.dp_rank, "tp_rank": self.tp_rank, "num_params": num,
                "trainable_params": counts["trainable"], "frozen_params": counts["frozen"]}

    def _build_optimizer(self, params: list[torch.nn.Parameter]) -> Any:
        """The optimizer ``train.optimizer_impl`` resolves to on this stage's device."""
        self.optimizer_impl = resolve_impl(self.cfg.train.optimizer_impl, self.device)
        if self.optimizer_impl == "megatron":
            from mimo_ray.stages.distributed_adam import DistributedAdam

            return DistributedAdam(self.module, self.cfg.train, self.dtype)
        return MixedPrecisionOptimizer(params, self.cfg.train)

    @property
    def _megatron(self) -> bool:
        return self.optimizer is not None and self.optimizer_impl == "megatron"

    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @property
    def loss_scale(self) -> float:
        """Factor every backward of this stage applies to its loss (the fp16 loss scale; 1 otherwise)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def backward_loss(self, loss: torch.Tensor) -> None:
        """Backward of a scalar loss, multiplied by the fp16 loss scale (a no-op factor otherwise)."""
        scale = self.loss_scale
        (loss * scale if scale != 1.0 else loss).backward()

    def _clear_grads(self) -> None:
        if self._megatron:  # main_grad is a view of Megatron's grad bucket: zero it, never drop it
            self.optimizer.zero_grad()
            return
        for _, p in self._named_params():
            p.grad = None
            if hasattr(p, "main_grad"):
                p.main_grad = None

    def _begin_step(self) -> None:
        """First training call of a step: fresh gradients, forget the previous step's."""
        if not self._in_step:
            self._in_step = True
            self._last_grads = {}
            self._clear_grads()

    @stage_call
    def reset_step(self) -> None:
        """Abandon a failed step: drop accumulated gradients and stored graphs so the next step starts clean."""
        self._clear_grads()
        self.__dict__.get("_graphs", {}).clear()
        self._in_step = False

    # ----- end of step --------------------------------------------------------------------------------------------
    @stage_call
    def reduce_grads(self, *lm_stats: dict[str, float] | None) -> float:
        """Sum the fp32 main gradients over the data-parallel ranks and divide by the global loss-token count (and the
        fp16 loss scale).

        Args:
            *lm_stats: the stats of every LM micro-batch of the step (each has ``num_tokens``); ``None`` entries
                (results of earlier calls, passed only so their errors propagate) are skipped.

        Returns:
            This rank's share of the squared global grad norm (torch optimizer: 0 on DP ranks other than 0; Megatron's
            distributed optimizer: the norm of the rank's reduce-scattered shard).

        Raises:
            ValueError: the global batch has no loss tokens.
        """
        from megatron.core import parallel_state

        num_tokens = math.fsum(s["num_tokens"] for s in lm_stats if s is not None)
        if num_tokens <= 0:
            raise ValueError("the global batch has no loss tokens (loss_mask is all zero)")
        if self._megatron:
            self.optimizer.reduce_grads(num_tokens * self.loss_scale)
            return self.optimizer.grad_sq_norm(count_replicated=self.tp_rank == 0)
        params = [p for _, p in self._named_params()]
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            # On the stage's device: the DP group is NCCL on GPU, which takes CUDA tensors only.
            has = [param_grad(p) is not None for p in params]
            has_grad = torch.tensor(has, dtype=torch.int32, device=self.device)
            dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
            for p, mine, anyone in zip(params, has, has_grad.tolist(), strict=True):
                if anyone and not mine:
                    p.main_grad = torch.zeros_like(p, dtype=torch.float32)
            grads = [g for g in (param_grad(p) for p in params) if g is not None]
            if grads:
                flat = _flatten_dense_tensors(grads)  # fp32 main grads: the DP sum runs in fp32
                dist.all_reduce(flat, group=group)
                for grad, reduced in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                    grad.copy_(reduced)
        divide_grads(params, num_tokens * self.loss_scale)
        if self.dp_rank != 0:
            return 0.0
        return grad_sq_norm(self._named_params(), count_replicated=self.tp_rank == 0)

    @stage_call
    def optimizer_step(self, lr: float, max_norm: float, *sq_norms: float) -> dict[str, float]:
        """Clip the fp32 main gradients by the global norm and step the fp32 masters; keeps the pre-clip gradients for
        :meth:`full_grads`. With fp16, a non-finite global norm (overflow anywhere) skips the step on every stage and
        the loss scale backs off.

        Args:
            lr: learning rate for this step.
            max_norm: ``train.grad_clip`` (0 = no clipping).
            *sq_norms: every rank's :meth:`reduce_grads` result, same order on every rank.

        Returns:
            ``{"grad_norm": pre-clip global norm, "clip_coef": applied factor, "skipped": 0/1, "loss_scale"}``.
        """
        norm = total_norm(sq_norms)
        skipped = self.scaler is not None and not math.isfinite(norm)
        coef = 1.0 if skipped else clip_coefficient(norm, max_norm)
        self._last_grads = {}
        for name, p in self._named_params() if not self._megatron else ():  # Megatron: in-place, zeroed after
            grad = param_grad(p)
            if grad is not None:
                self._last_grads[name] = grad  # step() scales into a new tensor: the pre-clip one stays readable
        if self.optimizer is not None and not skipped:
            set_lr(self.optimizer, lr)
            self.optimizer.step(coef)
        scale = self.loss_scale
        if self.scaler is not None:
            self.scaler.update(skipped)
        self._clear_grads()
        self._in_step = False
        return {"grad_norm": norm, "clip_coef": coef, "skipped": int(skipped), "loss_scale": scale}

    # ----- views for tests and checkpoints ------------------------------------------------------------------------
    def _gather_tp(self, param: torch.nn.Parameter, value: torch.Tensor) -> torch.Tensor:
        """The full tensor of a TP-sharded parameter (collective over the TP group; every TP rank must call)."""
        from megatron.core import parallel_state

        if self.tp == 1 or not is_tp_sharded(param):
            return value
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(value) for _ in range(self.tp)]
        dist.all_gather(parts, value.contiguous(), group=group)
        return unshard(parts, param.partition_dim, getattr(param, "partition_stride", 1))

    def _full_view(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self._named_params():
            if name in values:
                out[self.name_prefix + name] = self._gather_tp(p, values[name]).detach().cpu().clone()
        return out if self.rank == 0 else {}

    @stage_call
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Current values keyed like the fused model, TP-gathered; non-empty on rank 0 only (all ranks must call)."""
        return self._full_view({n: p.data for n, p in self._named_params()})

    @stage_call
    def full_grads(self) -> dict[str, torch.Tensor]:
        """Last step's pre-clip global-mean gradients keyed like the fused model; non-empty on rank 0 only.

        Raises:
            ValueError: with Megatron's distributed optimizer (its gradients are reduce-scattered shards, clipped in
                place and zeroed after the step: none are kept).
        """
        if self._megatron:
            raise ValueError("full_grads() is not available with train.optimizer_impl resolved to megatron")
        return self._full_view(self._last_grads)

    def _ckpt_file(self, path: str) -> Path:
        return Path(path) / self.role / f"tp{self.tp_rank}.pt"

    def _shard_file(self, path: str) -> Path:
        """Megatron's distributed optimizer: this (TP, DP) rank's optimizer shard (see ``distributed_adam.py``)."""
        return Path(path) / self.role / f"optim_tp{self.tp_rank}_dp{self.dp_rank}.pt"

    @stage_call
    def save(self, path: str) -> str | None:
        """Write this shard's model and optimizer state (DP rank 0 of each TP rank) as a tensors-only file; with
        Megatron's distributed optimizer every DP rank also writes its optimizer shard (:meth:`_shard_file`).

        Returns:
            The file written, or ``None`` on DP replicas.
        """
        file = self._ckpt_file(path)
        if self._megatron:
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.optimizer.shard_state(), self._shard_file(path))
        if self.dp_rank != 0:
            return None
        file.parent.mkdir(parents=True, exist_ok=True)
        model = {k: v.detach().cpu() for k, v in self.module.state_dict().items() if isinstance(v, torch.Tensor)}
        if self._megatron:
            optim = {"impl": "megatron"}
        else:
            optim = self.optimizer.state_dict() if self.optimizer is not None else {}
        if self.scaler is not None:
            optim["loss_scaler"] = self.scaler.state_dict()
        if optim:  # parameter names in optimizer order, so a changed model.freeze can still reload by name
            optim["param_names"] = [n for n, _ in self._named_params()]
        torch.save({"model": model, "optimizer": optim}, file)
        return str(file)

    @stage_call
    def load(self, path: str) -> None:
        """Load the file :meth:`save` wrote for this TP rank (every DP replica reads it) with ``weights_only``; a
        checkpoint written with another TP size is resharded (:meth:`_resharded_state`), so a run can resume with
        other ``parallel.lm_tp`` / ``lm_dp`` / ``encoder_dp``.

        Raises:
            ValueError: the file is missing or does not match the model's parameters.
        """
        file = self._ckpt_file(path)
        if not file.exists() and is_imported(path):  # a step-0 import: weights only, a fresh optimizer
            load_imported(self.module, path, self.name_prefix, self.tp_rank, self.tp)
            if self.optimizer is not None:  # 16-bit weights: fp32 masters from the imported weights
                self.optimizer.sync_masters()
            self._last_grads = {}
            self._in_step = False
            return
        saved_tp = len(list(file.parent.glob("tp*.pt")))
        if saved_tp and saved_tp != self.tp and self._megatron:
            raise ValueError(f"checkpoint {file.parent} has {saved_tp} TP shards, this run TP {self.tp}: Megatron's "
                             "distributed optimizer does not reshard; resume with the checkpoint's parallel.lm_tp")
        if saved_tp and saved_tp != self.tp:
            state = self._resharded_state(file.parent, saved_tp)
        elif not file.exists():
            raise ValueError(f"checkpoint file {file} does not exist")
        else:
            state = torch.load(file, map_location=self.device, weights_only=True)
        own = list(self.module.state_dict())
        # A checkpoint of the other layer layout (local vs transformer-engine norm names) loads by renaming.
        result = self.module.load_state_dict(match_module(state["model"], own), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"checkpoint {file}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
        optim = dict(state.get("optimizer") or {})
        if optim.get("param_names"):
            optim["param_names"] = rename_all(optim["param_names"], own)
        scaler = optim.pop("loss_scaler", None)
        if self.scaler is not None and scaler is not None:
            self.scaler.load_state_dict(scaler)
        impl = optim.pop("impl", "torch")
        if self.optimizer is not None and optim and impl != self.optimizer_impl:
            raise ValueError(f"checkpoint {file}: optimizer state of the {impl} optimizer, this stage runs the "
                             f"{self.optimizer_impl} one (train.optimizer_impl={self.cfg.train.optimizer_impl} on "
                             f"{self.device.type}); resume with the device kind and optimizer_impl it was written with")
        if self._megatron:
            shard = self._shard_file(path)
            if not optim:
                self.optimizer.sync_masters()  # weights only: fresh moments, masters from the loaded weights
            elif not shard.exists():
                raise ValueError(f"checkpoint {file.parent} lacks the optimizer shard {shard.name}")
            else:
                state_shard = torch.load(shard, map_location=self.device, weights_only=True)
                self.optimizer.load_shard_state(state_shard, str(shard))
        elif self.optimizer is not None and optim:
            self._load_optimizer(optim, optim.pop("param_names", None))
        elif self.optimizer is not None:  # weights only: the first step must start from them, not from stale masters
            self.optimizer.sync_masters()
        self._last_grads = {}
        self._in_step = False

    def _load_optimizer(self, saved: dict[str, Any], saved_names: list[str] | None) -> None:
        """Load optimizer state; when ``model.freeze`` changed since the save (staged training), by parameter name:
        parameters that trained before keep their moments, newly trained ones start fresh.
        """
        names = [n for n, _ in self._named_params()]
        if saved_names is None or saved_names == names:
            self.optimizer.load_state_dict(saved)
            return
        where = {name: i for i, name in enumerate(saved_names)}
        current = self.optimizer.state_dict()
        current["state"] = {i: saved["state"][where[n]] for i, n in enumerate(names)
                            if n in where and where[n] in saved["state"]}
        masters = saved.get("master_weights") or {}  # low-precision runs: fp32 masters by parameter index
        current["master_weights"] = {i: masters[where[n]] for i, n in enumerate(names)
                                     if n in where and where[n] in masters}
        if not current["master_weights"]:
            del current["master_weights"]
        self.optimizer.load_state_dict(current)

    def _resharded_state(self, folder: Path, saved_tp: int) -> dict[str, Any]:
        """The rank's model and optimizer state from a checkpoint written with another TP size (every old shard is
        read, merged and split again, see :mod:`mimo_ray.stages.reshard`).

        Raises:
            ValueError: a shard file is missing.
        """
        from mimo_ray.stages.reshard import reshard_model, reshard_optimizer, tp_layouts

        files = [folder / f"tp{r}.pt" for r in range(saved_tp)]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise ValueError(f"checkpoint {folder} lacks TP shard(s) {missing} (found {saved_tp} tp*.pt files)")
        old = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
        if (old[0].get("optimizer") or {}).get("impl") == "megatron":
            raise ValueError(f"checkpoint {folder}: Megatron's optimizer shards do not reshard to TP {self.tp}")
        layouts = tp_layouts(self.module.named_parameters(), swiglu=getattr(self.cfg.model.lm, "swiglu", False))
        own = list(self.module.state_dict())
        saved_names = (old[0].get("optimizer") or {}).get("param_names")
        # The saved optimizer's parameter order, under this module's layer-layout names.
        names = rename_all(saved_names, own) if saved_names else [n for n, _ in self._named_params()]
        model = reshard_model([match_module(o["model"], own) for o in old], layouts, self.tp, self.tp_rank)
        optim = reshard_optimizer([o["optimizer"] for o in old], names, layouts, self.tp, self.tp_rank)
        to = self.device
        return {"model": {k: v.to(to) for k, v in model.items()}, "optimizer": optim}
