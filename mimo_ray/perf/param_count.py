"""Exact parameter counts of our Megatron modules from the config alone (closed form; no model is built).

Every count is the ``numel`` sum the built module has (``tests/unit/test_memory_estimate.py`` checks them against
built tiny models). A transformer layer of width ``h``, MLP width ``f``, ``a`` heads of ``d = h / a`` and ``g``
key/value groups holds (``m = 2`` for SwiGLU's two fc1 halves, else 1)::

    linear_qkv   h*(h + 2*g*d)   (+ h + 2*g*d bias with linear biases or qkv_bias)     TP-sharded (dim 0)
    linear_proj  h*h             (+ h bias, replicated)                                 TP-sharded (dim 1)
    linear_fc1   m*f*h           (+ m*f bias)                                           TP-sharded (dim 0)
    linear_fc2   f*h             (+ h bias, replicated)                                 TP-sharded (dim 1)
    two norms    2*h             (+ 2*h LayerNorm biases; RMSNorm has none)             replicated

The LM adds the vocabulary-parallel embedding and (untied) output layer ``V_pad*h`` each (``V_pad``: the vocabulary
padded for TP), the final norm and, for learned absolute positions, ``seq*h`` (replicated). A TP rank holds
``sharded / tp + replicated``. LLaMA-7B's shape (h 4096, f 11008, 32 layers, V 32000, untied) gives 6,738,415,616.

    lm_params(cfg.model.lm, tp=2).per_rank          # parameters on one LM GPU
    modality_params(cfg.model, "video")             # CLIP ViT + projector of the video group
"""

from __future__ import annotations

from dataclasses import dataclass

from mimo_ray.config import LMConfig, ModelConfig


@dataclass(frozen=True)
class ParamCount:
    """Parameters of a module split by tensor parallelism.

    Attributes:
        sharded: elements of TP-partitioned tensors (all ranks together).
        replicated: elements every TP rank holds in full.
        tp: the tensor-parallel size the counts are for.
    """

    sharded: int
    replicated: int
    tp: int = 1

    @property
    def total(self) -> int:
        """Elements of the whole module (each counted once)."""
        return self.sharded + self.replicated

    @property
    def per_rank(self) -> int:
        """Elements one TP rank holds."""
        return self.sharded // self.tp + self.replicated

    def __add__(self, other: ParamCount) -> ParamCount:
        if other.tp != self.tp:
            raise ValueError(f"cannot add parameter counts for TP {self.tp} and TP {other.tp}")
        return ParamCount(self.sharded + other.sharded, self.replicated + other.replicated, self.tp)


def layer_params(hidden: int, ffn: int, heads: int, groups: int | None = None, *, swiglu: bool = False,
                 bias: bool = True, qkv_bias: bool = False, layernorm: bool = True) -> ParamCount:
    """One transformer layer (local or TE layout: the same tensors, the norms named differently).

    Args:
        hidden: width ``h``.
        ffn: MLP width ``f``.
        heads: attention heads ``a``.
        groups: key/value groups ``g`` (``None``: ``a``).
        swiglu: gated MLP (fc1 holds gate and up).
        bias: biases on every linear (``add_bias_linear``).
        qkv_bias: biases on ``linear_qkv`` only (Qwen2).
        layernorm: LayerNorm (weight and bias) rather than RMSNorm (weight).
    """
    groups = heads if groups is None else groups
    qkv_rows = hidden + 2 * groups * (hidden // heads)
    mlp = 2 if swiglu else 1
    sharded = qkv_rows * hidden + hidden * hidden + mlp * ffn * hidden + ffn * hidden
    if bias or qkv_bias:
        sharded += qkv_rows
    replicated = 2 * hidden * (2 if layernorm else 1)
    if bias:
        sharded += mlp * ffn
        replicated += 2 * hidden  # linear_proj and linear_fc2 biases are added after the TP reduction
    return ParamCount(sharded, replicated)


def lm_params(lm: LMConfig, tp: int = 1) -> ParamCount:
    """The GPT language model on ``tp`` tensor-parallel ranks (vocabulary padded for ``tp``)."""
    layer = layer_params(lm.hidden_size, lm.ffn_hidden_size or 4 * lm.hidden_size, lm.num_attention_heads,
                         lm.num_query_groups, swiglu=lm.swiglu, bias=lm.add_bias_linear, qkv_bias=lm.qkv_bias,
                         layernorm=lm.normalization == "LayerNorm")
    h, vocab = lm.hidden_size, lm.padded_vocab_size(tp)
    tables = vocab * h * (2 if lm.untie_embeddings_and_output_weights else 1)
    replicated = lm.num_layers * layer.replicated + h * (2 if lm.normalization == "LayerNorm" else 1)
    if lm.position_embedding_type == "learned_absolute":
        replicated += lm.seq_length * h
    return ParamCount(lm.num_layers * layer.sharded + tables, replicated, tp)


def projector_params(in_size: int, out_size: int, ffn: int | None, projector_type: str) -> int:
    """A modality projector (MLP ``in → ffn → out`` with biases, ``ffn`` defaulting to ``out``; affine ``in → out``)."""
    if projector_type == "affine":
        return in_size * out_size + out_size
    ffn = ffn or out_size
    return in_size * ffn + ffn + ffn * out_size + out_size


def _encoder_layers(num_layers: int, hidden: int, ffn: int | None, heads: int) -> int:
    return num_layers * layer_params(hidden, ffn or 4 * hidden, heads).total


def vision_params(model: ModelConfig) -> int:
    """Our CLIP ViT (``built_layers`` layers, no final norm) without its projector."""
    v = model.vision
    h = v.hidden_size
    stem = h * 3 * v.patch_dim**2 + h + (v.grid**2 + 1) * h + 2 * h  # conv1 (no bias), class token, positions, ln_pre
    return stem + _encoder_layers(v.built_layers, h, v.ffn_hidden_size, v.num_attention_heads)


def audio_params(model: ModelConfig) -> int:
    """Our Whisper or BEATs encoder (with its final norm) without its projector; Whisper's positional table is a
    buffer, not a parameter.
    """
    a = model.audio
    h = a.hidden_size
    if a.backbone_type == "whisper":
        stem = (h * a.n_mels * 3 + h) + (h * h * 3 + h)  # conv1, conv2
    else:
        patches = (a.num_input_frames // a.patch_size) * (a.fbank_bins // a.patch_size)
        stem = h * a.patch_size**2 + patches * h + 2 * h  # patch conv (no bias), positions, input norm
    return stem + _encoder_layers(a.num_layers, h, a.ffn_hidden_size, a.num_attention_heads) + 2 * h


def modality_params(model: ModelConfig, modality: str) -> int:
    """One input modality's submodules: encoder plus projector to the LM width.

    Raises:
        ValueError: a user modality (its spec is not ours to count).
    """
    lm_h = model.lm.hidden_size
    if modality in ("video", "images"):
        v = model.vision
        return vision_params(model) + projector_params(v.hidden_size, lm_h, v.projector_ffn_hidden_size,
                                                       v.projector_type)
    if modality == "audio":
        a = model.audio
        return audio_params(model) + projector_params(a.hidden_size, lm_h, a.projector_ffn_hidden_size,
                                                      a.projector_type)
    raise ValueError(f"modality {modality!r} has a user spec: mimo_ray cannot count its parameters")
