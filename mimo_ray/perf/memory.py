"""Memory each actor group holds per GPU, by arithmetic from the config (``jobs/gpu_check.py`` prints it first):
parameters, weights, gradients, optimizer state, activations and the optimizer step's transient peak.

Bytes per parameter (``mixed``: bf16/fp16 parameters; fp32 parameters are their own masters):

- ``local`` (what :class:`mimo_ray.stages.precision.MixedPrecisionOptimizer` holds today on every DP rank):
  weight 2 + fp32 main grad 4 + fp32 master 4 + AdamW moments 8 = 18 (fp32: 4 + 4 + 8 = 16). Its step briefly adds
  8 more: the clipped gradients ``main_grad * coef`` are new fp32 tensors (4, when clipping is active) and
  ``torch.optim.AdamW``'s foreach path allocates ``sqrt(v)`` for all parameters at once (4).
- ``megatron-distributed`` (Megatron's ``DistributedOptimizer``, ZeRO-1, :class:`mimo_ray.stages.distributed_adam.
  DistributedAdam`): weight 2 + fp32 grad buffer 4 + (fp32 master 4 + moments 8) / DP; its fused Adam and in-place
  clipping add nothing. The buckets' padding (parameters start at multiples of 64 elements, buckets end at multiples
  of lcm(DP, 128)) is left out: < 0.1 % for 7B shapes.

Which one a GPU run uses is ``train.optimizer_impl`` (:func:`gpu_optimizer`): ``auto`` (the default) and ``megatron``
run ``megatron-distributed`` in every group on CUDA, ``torch`` runs ``local``.

Activations per transformer layer (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", 16-bit activations, recompute off; ``s`` sequence, ``b`` micro-batch, ``h`` width, ``a`` heads, ``t``
TP size): ``s*b*h*(10 + 24/t + 5*a*s/(h*t))`` bytes, or ``s*b*h*(34 + 5*a*s/h)/t`` with sequence parallelism. The
``5*a*s/h`` term is the stored ``s x s`` attention scores; flash attention (our SDPA default, TE) keeps none, so it
is left out unless ``model.attention_backend=local``. The paper derives 34 for a 4h GELU MLP; LLaMA's SwiGLU at
f = 2.69h stores about the same. With ``model.recompute`` (full, uniform, 1 layer) a layer keeps its input ``2*s*b*h``
and one layer is recomputed at a time. The LM adds ``6*s*b*V_pad/t`` for the logits (the bf16 output and the fp32
copy the cross-entropy keeps). Encoders run on their own sequences (a ViT frame: patches + class token, all frames
of a micro-batch as its batch; Whisper: ``ceil(T/2)`` positions) with up to ``1 + parallel.prefetch_microbatches``
micro-batches in flight. Convolution stems, pooling and projectors (O(tokens * width)) are left out.

    table = memory_table(load_config("avlm-7b"), lm_tp=2)        # estimate against an 80 GB H100
    print(table.render())
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo_ray.config import Config
from mimo_ray.perf.param_count import ParamCount, lm_params, modality_params
from mimo_ray.perf.report import Table

GiB = 2**30
#: What ``torch.cuda.mem_get_info()`` / nvidia-smi report as the total of an "80 GB" H100 (81,559 MiB).
H100_80GB_BYTES = 81559 * 2**20
#: Held back from the capacity: CUDA context, NCCL buffers, allocator fragmentation.
RESERVE_BYTES = 4 * GiB
IMPLS = ("local", "megatron-distributed")


@dataclass(frozen=True)
class ParamBytes:
    """Bytes per parameter: the weight itself, its gradient and the optimizer's state."""

    weights: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        """Weights + grads + optimizer state."""
        return self.weights + self.grads + self.optimizer


def optimizer_bytes_per_param(impl: str, dp: int = 1, mixed_precision: bool = True) -> ParamBytes:
    """Resident bytes per parameter of one GPU (see the module docstring).

    Args:
        impl: ``local`` (mimo_ray's optimizer, replicated on every DP rank) or ``megatron-distributed``
            (master weights and moments sharded over the ``dp`` data-parallel ranks).
        dp: data-parallel size.
        mixed_precision: 16-bit parameters with fp32 masters (``False``: fp32 parameters, their own masters).

    Raises:
        ValueError: an unknown ``impl`` or ``dp < 1``.
    """
    if dp < 1:
        raise ValueError(f"dp={dp} must be >= 1")
    weight, master = (2, 4) if mixed_precision else (4, 0)
    state = master + 8  # fp32 master (mixed precision only) + AdamW exp_avg and exp_avg_sq
    if impl == "local":
        return ParamBytes(weight, 4, state)
    if impl == "megatron-distributed":
        return ParamBytes(weight, 4, state / dp)
    raise ValueError(f"optimizer impl {impl!r} is not one of {', '.join(IMPLS)}")


def gpu_optimizer(cfg: Config) -> str:
    """The optimizer rows a CUDA run of ``cfg`` uses: ``megatron-distributed`` unless ``train.optimizer_impl=torch``."""
    return "local" if cfg.train.optimizer_impl == "torch" else "megatron-distributed"


def step_transient_bytes_per_param(impl: str) -> float:
    """Extra bytes per parameter while the optimizer steps (activations are freed by then)."""
    if impl not in IMPLS:
        raise ValueError(f"optimizer impl {impl!r} is not one of {', '.join(IMPLS)}")
    return 8.0 if impl == "local" else 0.0


def layer_activation_bytes(seq: int, batch: int, hidden: int, heads: int, tp: int = 1, *,
                           sequence_parallel: bool = False, flash: bool = True) -> float:
    """Activation bytes one transformer layer keeps for its backward (Korthikanti et al., 16-bit, no recompute).

    Returns:
        ``s*b*h*(10 + 24/t)`` (``s*b*h*34/t`` with sequence parallelism) plus ``5*a*s^2*b/t`` unless ``flash``.
    """
    sbh = seq * batch * hidden
    out = sbh * 34 / tp if sequence_parallel else sbh * (10 + 24 / tp)
    if not flash:
        out += 5 * heads * seq * seq * batch / tp
    return out


def _stack_activations(num_layers: int, seq: int, batch: int, hidden: int, heads: int, tp: int, flash: bool,
                       recompute: bool) -> float:
    one = layer_activation_bytes(seq, batch, hidden, heads, tp, flash=flash)
    if recompute:
        return num_layers * 2 * seq * batch * hidden + one
    return num_layers * one


@dataclass(frozen=True)
class GroupMemory:
    """One GPU of one actor group, in bytes."""

    group: str
    impl: str
    tp: int
    dp: int
    params: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    step_transient: float

    @property
    def total(self) -> float:
        """Resident state plus the larger of the backward's activations and the optimizer step's transients."""
        return self.weights + self.grads + self.optimizer + max(self.activations, self.step_transient)

    def fits(self, capacity: float, reserve: float = RESERVE_BYTES) -> bool:
        """Whether :attr:`total` fits ``capacity`` less ``reserve``."""
        return self.total <= capacity - reserve


def _group(name: str, impl: str, tp: int, dp: int, params: int, mixed: bool, activations: float) -> GroupMemory:
    per = optimizer_bytes_per_param(impl, dp, mixed)
    return GroupMemory(name, impl, tp, dp, params, params * per.weights, params * per.grads,
                       params * per.optimizer, activations, params * step_transient_bytes_per_param(impl))


def encoder_activations(cfg: Config, modality: str) -> float:
    """Activation bytes of one encoder GPU for ``modality`` (micro-batches in flight included)."""
    model, micro = cfg.model, cfg.data.micro_batch_size
    flash = model.attention_backend != "local"
    if modality in ("video", "images"):
        v = model.vision
        frames = micro * (v.num_frames if modality == "video" else 1)
        one = _stack_activations(v.built_layers, v.grid**2 + 1, frames, v.hidden_size, v.num_attention_heads, 1,
                                 flash, model.recompute)
    elif modality == "audio":
        a = model.audio
        if a.backbone_type == "whisper":
            seq = (a.num_input_frames - 1) // 2 + 1
        else:
            seq = (a.num_input_frames // a.patch_size) * (a.fbank_bins // a.patch_size)
        one = _stack_activations(a.num_layers, seq, micro, a.hidden_size, a.num_attention_heads, 1, flash,
                                 model.recompute)
    else:
        raise ValueError(f"modality {modality!r} has a user spec: mimo_ray cannot estimate its activations")
    per_step = max(1, cfg.data.global_batch_size // (micro * cfg.parallel.encoder_dp))
    return one * min(1 + cfg.parallel.prefetch_microbatches, per_step)


def lm_activations(cfg: Config, tp: int) -> float:
    """Activation bytes of one LM GPU at TP ``tp`` (one micro-batch; no sequence parallelism)."""
    lm, model = cfg.model.lm, cfg.model
    micro = cfg.parallel.lm_micro_batch_size or cfg.data.micro_batch_size
    stack = _stack_activations(lm.num_layers, lm.seq_length, micro, lm.hidden_size, lm.num_attention_heads, tp,
                               model.attention_backend != "local", model.recompute)
    return stack + 6 * lm.seq_length * micro * lm.padded_vocab_size(tp) / tp


def group_estimates(cfg: Config, lm_tp: int = 2, lm_dps: tuple[int, ...] = (1, 2, 4, 8)) -> list[GroupMemory]:
    """Rows of :func:`memory_table`: each encoder modality's group, both encoders in one (``shared``) group (with
    the optimizer of :func:`gpu_optimizer`), and one LM GPU at ``lm_tp`` with the local optimizer and with Megatron's
    distributed optimizer at each of ``lm_dps``.
    """
    mixed = cfg.model.params_dtype != "fp32"
    rows = []
    enc = [m for m in cfg.model.modalities if m in ("video", "images", "audio")]
    dp, impl = cfg.parallel.encoder_dp, gpu_optimizer(cfg)
    for mod in enc:
        rows.append(_group(f"encoder-{mod}", impl, 1, dp, modality_params(cfg.model, mod), mixed,
                           encoder_activations(cfg, mod)))
    if len(enc) > 1:
        rows.append(_group("encoder-shared", impl, 1, dp, sum(r.params for r in rows), mixed,
                           sum(r.activations for r in rows)))
    lm: ParamCount = lm_params(cfg.model.lm, lm_tp)
    act = lm_activations(cfg, lm_tp)
    rows.append(_group("lm", "local", lm_tp, cfg.parallel.lm_dp, lm.per_rank, mixed, act))
    rows += [_group("lm", "megatron-distributed", lm_tp, d, lm.per_rank, mixed, act) for d in lm_dps]
    return rows


def memory_table(cfg: Config, lm_tp: int = 2, lm_dps: tuple[int, ...] = (1, 2, 4, 8), *,
                 capacity: float | None = None, preset: str = "", reserve: float = RESERVE_BYTES) -> Table:
    """The per-GPU memory table.

    Args:
        cfg: the config whose shapes are counted.
        lm_tp: the LM's tensor-parallel size.
        lm_dps: data-parallel sizes tabled for Megatron's distributed optimizer.
        capacity: measured GPU memory (``torch.cuda.mem_get_info()[1]``); ``None``: an 80 GB H100, and the title
            says "estimate".
        preset: the preset's name for the title.
        reserve: bytes held back from the capacity.
    """
    measured = capacity is not None
    cap = float(capacity) if measured else float(H100_80GB_BYTES)
    lm = cfg.model.lm
    micro = cfg.parallel.lm_micro_batch_size or cfg.data.micro_batch_size
    where = f"measured GPU total {cap / GiB:.1f} GiB" if measured else "estimate for an 80 GB H100"
    title = (f"7B memory fit (arithmetic{', ' + where}): {preset or 'config'}, LM TP={lm_tp}, "
             f"{cfg.model.params_dtype}, micro-batch {micro}, LM seq {lm.seq_length}")
    fit = f"fits {cap / GiB:.1f} GiB"
    table = Table("memory", title, ["group", "optimizer", "TP", "DP", "params/GPU", "weights GiB", "grads GiB",
                                    "optimizer GiB", "activations GiB", "step peak GiB", "total GiB", fit])
    for r in group_estimates(cfg, lm_tp, lm_dps):
        table.add([r.group, r.impl, r.tp, r.dp, f"{r.params:,}", r.weights / GiB, r.grads / GiB,
                   r.optimizer / GiB, r.activations / GiB, r.step_transient / GiB, r.total / GiB,
                   "yes" if r.fits(cap, reserve) else "NO"])
    full = lm_params(lm, lm_tp)
    attn = "flash (no s x s scores)" if cfg.model.attention_backend != "local" else "unfused (s x s scores kept)"
    table.notes += [
        f"LM: {full.total:,} parameters (TP-sharded {full.sharded:,}, replicated {full.replicated:,}); one GPU holds "
        f"sharded / {lm_tp} + replicated = {full.per_rank:,}",
        "bytes/param: local 2 weight + 4 fp32 main grad + 4 fp32 master + 8 AdamW = 18, step peak +8 (clipped grad "
        "copies, foreach AdamW sqrt(v)); megatron-distributed 2 + 4 fp32 grad buffer + 12/DP",
        f"train.optimizer_impl={cfg.train.optimizer_impl}: a CUDA run uses {gpu_optimizer(cfg)} in every group "
        "(auto/megatron: Megatron DDP + DistributedOptimizer; torch: local)",
        f"activations: Korthikanti et al. s*b*h*(10 + 24/t) per layer, attention {attn}, "
        f"recompute {'on' if cfg.model.recompute else 'off'}, no sequence parallelism; LM logits 6*s*b*V/t",
        f"total = weights + grads + optimizer + max(activations, step peak); fits = total <= capacity - "
        f"{reserve / GiB:.0f} GiB reserve (CUDA context, NCCL, fragmentation)",
    ]
    return table
