"""Analytic FLOP counts of a MIMO training step from the config (for MFU), per encoder and for the LM.

Conventions (the ones behind the H100 numbers of NOTES §5, and PaLM / Megatron-LM's classic MFU formula):

- A matmul ``[m, k] @ [k, n]`` is ``2*m*k*n`` FLOPs; biases, norms, activations, softmax, pooling, RoPE and the
  optimizer are ignored (they are O(tokens * width), not O(tokens * width^2)).
- Transformer layer, width ``h``, MLP width ``f``, ``a`` heads of ``d = h / a``, ``g`` key/value groups, sequence
  ``s``; per sequence, forward::

      matmul = 2 * s * (h*(h + 2*g*d)  +  h*h  +  h*f*(2 if swiglu else 1)  +  f*h)     # QKV, out-proj, fc1, fc2
      attn   = 4 * s^2 * h                                                          # QK^T and P·V

  ``attn`` counts the full ``s x s`` score matrix also for the causal LM (no 1/2 discount), as PaLM does.
- Training = 3 x forward (backward = 2 x forward: input and weight gradients). Every part is trained here (the
  encoders get gradients from the LM), so every part counts 3x.
- Per sample: the ViT runs once per frame on ``(img/patch)^2 + 1`` tokens (class token) with a patch-embedding
  conv ``2 * P * 3*p^2 * Hv``; the vision projector runs on the pooled ``num_frames * tokens_per_frame`` tokens.
  Whisper: ``conv1 = 2 * T * 3*n_mels * Ha``, ``conv2 = 2 * T' * 3*Ha * Ha`` with ``T' = (T-1)//2 + 1`` encoder
  positions; BEATs: ``2 * P * p^2 * Ha`` for the patch conv and ``P`` positions. Projectors (MLP): ``2 * n *
  (H_in*F + F*H_lm)`` over their ``n`` output tokens (affine: ``2 * n * H_in * H_lm``). The LM runs on the whole
  padded ``seq_length`` and adds the output layer ``2 * s * h * V``.

    fl = train_flops_per_step(load_config("bench-s"))      # ≈ 2.6e13 per step of 4 samples
    forward_flops_per_sample(cfg)                          # {"video": …, "audio": …, "lm": …}
"""

from __future__ import annotations

from mimo_ray.config import AudioConfig, Config, LMConfig, ModelConfig, VisionConfig

#: Backward ≈ 2 x forward, so a training step is 3 x the forward FLOPs.
TRAIN_MULTIPLIER = 3


def transformer_layer_flops(
    seq: int, hidden: int, ffn: int, heads: int, groups: int | None = None, swiglu: bool = False
) -> int:
    """Forward FLOPs of one transformer layer on one sequence.

    Args:
        seq: sequence length ``s``.
        hidden: width ``h``.
        ffn: MLP width ``f``.
        heads: attention heads ``a``.
        groups: key/value groups ``g`` (``None``: ``a``, plain multi-head attention).
        swiglu: gated MLP (two fc1 halves).

    Returns:
        ``2*s*(h*(h + 2*g*d) + h*h + h*f*(1 + swiglu) + f*h) + 4*s^2*h`` with ``d = h / a``.
    """
    groups = heads if groups is None else groups
    kv = 2 * groups * (hidden // heads)
    weights = hidden * (hidden + kv) + hidden * hidden + hidden * ffn * (2 if swiglu else 1) + ffn * hidden
    return 2 * seq * weights + 4 * seq * seq * hidden


def projector_flops(tokens: int, in_size: int, out_size: int, ffn: int | None, projector_type: str) -> int:
    """Forward FLOPs of a modality projector on ``tokens`` rows (MLP: in → ffn → out; affine: in → out)."""
    if projector_type == "affine":
        return 2 * tokens * in_size * out_size
    ffn = ffn or out_size
    return 2 * tokens * (in_size * ffn + ffn * out_size)


def vision_forward_flops(v: VisionConfig, lm_hidden: int, frames: int) -> dict[str, int]:
    """Forward FLOPs of the ViT (per frame, times ``frames``) and the vision projector for one sample.

    Returns:
        ``{"encoder": …, "projector": …}``.
    """
    patches = v.grid * v.grid
    tokens = patches + 1  # class token
    ffn = v.ffn_hidden_size or 4 * v.hidden_size
    per_frame = 2 * patches * (3 * v.patch_dim * v.patch_dim) * v.hidden_size
    per_frame += v.built_layers * transformer_layer_flops(tokens, v.hidden_size, ffn, v.num_attention_heads)
    out_tokens = frames * v.tokens_out_per_frame
    proj = projector_flops(out_tokens, v.hidden_size, lm_hidden, v.projector_ffn_hidden_size, v.projector_type)
    return {"encoder": frames * per_frame, "projector": proj}


def audio_forward_flops(a: AudioConfig, lm_hidden: int) -> dict[str, int]:
    """Forward FLOPs of the Whisper / BEATs encoder and the audio projector for one clip.

    Returns:
        ``{"encoder": …, "projector": …}``.
    """
    h = a.hidden_size
    ffn = a.ffn_hidden_size or 4 * h
    if a.backbone_type == "whisper":
        frames = a.num_input_frames
        positions = (frames - 1) // 2 + 1
        stem = 2 * frames * (3 * a.n_mels) * h + 2 * positions * (3 * h) * h
    else:
        positions = a.max_audio_tokens
        stem = 2 * positions * (a.patch_size * a.patch_size) * h
    enc = stem + a.num_layers * transformer_layer_flops(positions, h, ffn, a.num_attention_heads)
    proj = projector_flops(a.audio_seq_len, h, lm_hidden, a.projector_ffn_hidden_size, a.projector_type)
    return {"encoder": enc, "projector": proj}


def lm_forward_flops(lm: LMConfig) -> int:
    """Forward FLOPs of the GPT on one padded sequence of ``seq_length`` (layers plus the output layer)."""
    ffn = lm.ffn_hidden_size or 4 * lm.hidden_size
    layer = transformer_layer_flops(
        lm.seq_length, lm.hidden_size, ffn, lm.num_attention_heads, lm.num_query_groups, lm.swiglu
    )
    return lm.num_layers * layer + 2 * lm.seq_length * lm.hidden_size * lm.vocab_size


def forward_flops_per_sample(cfg: Config | ModelConfig) -> dict[str, int]:
    """Forward FLOPs of one sample, per part.

    Args:
        cfg: the config (or its model section).

    Returns:
        ``{modality: encoder + projector FLOPs, …, "lm": LM FLOPs}`` for every configured modality.
    """
    model = cfg.model if isinstance(cfg, Config) else cfg
    h = model.lm.hidden_size
    out: dict[str, int] = {}
    for mod in model.modalities:
        if mod == "video":
            parts = vision_forward_flops(model.vision, h, model.vision.num_frames)
        elif mod == "images":
            parts = vision_forward_flops(model.vision, h, 1)
        else:
            parts = audio_forward_flops(model.audio, h)
        out[mod] = parts["encoder"] + parts["projector"]
    out["lm"] = lm_forward_flops(model.lm)
    return out


def train_flops_per_step(cfg: Config) -> int:
    """FLOPs of one optimizer step: ``3 * data.global_batch_size * sum(forward_flops_per_sample(cfg))``."""
    return TRAIN_MULTIPLIER * cfg.data.global_batch_size * sum(forward_flops_per_sample(cfg).values())


def train_flops_breakdown(cfg: Config) -> dict[str, int]:
    """:func:`train_flops_per_step` split per part (``{modality: …, "lm": …}``; the values sum to the total)."""
    scale = TRAIN_MULTIPLIER * cfg.data.global_batch_size
    return {part: scale * value for part, value in forward_flops_per_sample(cfg).items()}


def lm_tokens_per_step(cfg: Config) -> int:
    """LM positions processed per step (``global_batch_size * seq_length``, padding included): the tokens/s base."""
    return cfg.data.global_batch_size * cfg.model.lm.seq_length


def mfu(flops_per_step: float, step_time_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (``peak_tflops`` in TFLOP/s)."""
    if step_time_s <= 0 or peak_tflops <= 0:
        return float("nan")
    return flops_per_step / step_time_s / (peak_tflops * 1e12)
