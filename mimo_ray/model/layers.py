"""Transformer configs and layer specs for every Megatron transformer in the model (ViT, audio encoder, GPT).

Three attention backends, selected by ``model.attention_backend``:
- ``sdpa`` (default): :class:`~mimo_ray.model.attention.SDPAttention` in a local (pure-PyTorch) layer;
- ``local``: Megatron's own ``DotProductAttention`` in the same layer;
- ``te``: transformer-engine layers everywhere, only where ``transformer_engine`` is importable (GPU clusters).

The LM's layers follow ``model.transformer_impl`` (:func:`resolve_transformer_impl`): ``auto`` builds Megatron's
transformer-engine spec where TE is importable and the model is built on CUDA, the local layer above otherwise (the
CPU path). The two have different parameter names for the layer norms (:mod:`mimo_ray.parallel.layer_layout`).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from mimo_ray.config import ModelConfig
from mimo_ray.model.attention import SDPAttention

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's activation ``x * sigmoid(1.702 x)``; a plain function (Megatron's goes through torch.compile)."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}


def te_available() -> bool:
    """Whether transformer-engine can be imported here (never on our CPU machines)."""
    return importlib.util.find_spec("transformer_engine") is not None


def resolve_transformer_impl(model: ModelConfig, cuda: bool | None = None) -> str:
    """The LM's layer implementation for ``model.transformer_impl`` in this process.

    Args:
        model: the model section.
        cuda: whether the model is built on CUDA (``None``: ``torch.cuda.is_available()``, which is what
            :func:`mimo_ray.parallel.megatron_setup.default_device` places the model by).

    Returns:
        ``transformer_engine`` or ``local``.

    Raises:
        ValueError: ``transformer_engine`` asked for (or ``attention_backend='te'``) where TE is not importable.
    """
    impl = model.transformer_impl
    if model.attention_backend == "te":  # TE everywhere (the config refuses it together with transformer_impl=local)
        if not te_available():
            raise ValueError("model.attention_backend='te' needs transformer_engine, which is not importable here")
        return "transformer_engine"
    if impl == "auto":
        on_cuda = torch.cuda.is_available() if cuda is None else cuda
        return "transformer_engine" if on_cuda and te_available() else "local"
    if impl == "transformer_engine" and not te_available():
        raise ValueError(
            "model.transformer_impl='transformer_engine' needs transformer_engine, which is not importable here; "
            "use model.transformer_impl=auto (TE where importable on CUDA) or local"
        )
    return impl


def te_layer_spec(causal: bool) -> ModuleSpec:
    """Megatron's transformer-engine GPT layer spec (``linear_qkv`` / ``linear_fc1`` fuse the layer norms) with
    causal or bidirectional self-attention. Needs ``transformer_engine``.
    """
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    spec = get_gpt_layer_with_transformer_engine_spec()
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    spec.submodules.self_attention.params = {"attn_mask_type": mask}
    return spec


def lm_layer_spec(model: ModelConfig, cuda: bool | None = None) -> ModuleSpec:
    """The LM's (causal) layer spec: TE's where :func:`resolve_transformer_impl` says so, else the local layer with
    ``model.attention_backend``'s core attention.
    """
    if resolve_transformer_impl(model, cuda) == "transformer_engine":
        return te_layer_spec(causal=True)
    return layer_spec(model.attention_backend, causal=True)


def transformer_config(
    model: ModelConfig,
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int | None = None,
    num_query_groups: int | None = None,
    normalization: str = "LayerNorm",
    swiglu: bool = False,
    add_bias_linear: bool = True,
    activation: str = "gelu",
    layernorm_epsilon: float = 1e-5,
    qkv_bias: bool = False,
) -> TransformerConfig:
    """A Megatron ``TransformerConfig`` for one transformer of the model.

    Args:
        model: the model section (precision, dropout, init std, recompute).
        num_layers: transformer layers.
        hidden_size: model width H.
        num_attention_heads: attention heads.
        ffn_hidden_size: MLP width; ``4 * hidden_size`` when ``None``.
        num_query_groups: GQA groups; ``num_attention_heads`` when ``None``.
        normalization: ``LayerNorm`` or ``RMSNorm``.
        swiglu: gated SiLU MLP (LLaMA/Vicuna) instead of GELU.
        add_bias_linear: biases in linear layers.
        activation: MLP activation without SwiGLU, ``gelu`` or ``quick_gelu``.
        layernorm_epsilon: epsilon of every norm.
        qkv_bias: biases on the q/k/v projection even without ``add_bias_linear``.

    Returns:
        The config, with CPU initialisation so weights are identical for any device and TP size.
    """
    dtype = DTYPES[model.params_dtype]
    return TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        normalization=normalization,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else ACTIVATIONS[activation],
        add_bias_linear=add_bias_linear,
        add_qkv_bias=qkv_bias,
        layernorm_epsilon=layernorm_epsilon,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        recompute_granularity="full" if model.recompute else None,
        recompute_method="uniform" if model.recompute else None,
        recompute_num_layers=1 if model.recompute else None,
    )


def mlp_spec() -> ModuleSpec:
    """Dense MLP with tensor-parallel linears."""
    return ModuleSpec(
        module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
    )


def layer_spec(backend: str, *, causal: bool) -> ModuleSpec:
    """One transformer layer spec.

    Args:
        backend: ``sdpa``, ``local`` or ``te``.
        causal: causal self-attention (LM) or bidirectional (encoders).

    Returns:
        A ``TransformerLayer`` spec.

    Raises:
        ValueError: for ``te`` when transformer-engine is not importable, or an unknown backend.
    """
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    if backend == "te":
        if not te_available():
            raise ValueError("model.attention_backend='te' needs transformer_engine, which is not importable here")
        return te_layer_spec(causal)
    if backend not in ("sdpa", "local"):
        raise ValueError(f"model.attention_backend={backend!r} is not allowed; choose one of sdpa, local, te")
    core = SDPAttention if backend == "sdpa" else DotProductAttention
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=WrappedTorchNorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=core,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=WrappedTorchNorm,
            mlp=mlp_spec(),
            mlp_bda=get_bias_dropout_add,
        ),
    )
