"""One dataclass tree for every knob of mimo_ray: each part's section is named after the code it configures
(``model.lm`` → ``model/layers.py``, ``model.vision`` → ``model/vision.py``, ``model.audio`` → ``model/audio.py``,
``model.outputs`` → ``model/decoders.py``, ``data`` → ``data/``, ``parallel`` → ``parallel/`` and ``runtime/``,
``train`` → ``driver/train_loop.py``, ``infer`` → ``driver/infer_loop.py``, ``cluster`` → ``ray.init``), and every
value is checked where it is defined. Reading YAML presets, overrides and job flags: :mod:`mimo_ray.config_cli`.

    cfg = load_config("tiny", ["model.lm.num_layers=4"])        # from mimo_ray.config_cli
    cfg.model.lm.num_layers, cfg.model.token_ids()              # 4, {"video": 261, "audio": 262, ...}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

#: The modalities our config tree builds specs for (``model.vision`` / ``model.audio``). Any other name is a user
#: modality: its ``ModalitySubmodules`` spec comes from the user (``mimo_ray.build_mimo_config`` + their entries,
#: or ``model.spec_factory``), its placeholder id from ``model.special_token_ids``.
MODALITIES = ("video", "audio", "images")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The byte tokenizer's special tokens (ids 256…265); a Hugging Face tokenizer gets the same names. The default
#: ``model.special_token_ids`` and ``model.outputs.<name>.token_id`` are derived from this table.
SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": 256,
    "<bos>": 257,
    "<eos>": 258,
    "<|user|>": 259,
    "<|assistant|>": 260,
    "<video>": 261,
    "<audio>": 262,
    "<image>": 263,
    "<image_gen>": 264,
    "<audio_gen>": 265,
}
#: The tag that stands for each input modality in a human turn.
MODALITY_TAGS: dict[str, str] = {"video": "<video>", "audio": "<audio>", "images": "<image>"}


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")


def _check_positive(obj: Any, *names: str, allow_zero: bool = False) -> None:
    prefix = getattr(obj, "_path", type(obj).__name__)
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        if value < 0 or (value == 0 and not allow_zero):
            bound = ">= 0" if allow_zero else "> 0"
            raise ValueError(f"{prefix}.{name}={value!r} is not allowed; must be {bound}")


@dataclass
class LMConfig:
    """Megatron GPTModel shape."""

    _path = "model.lm"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int | None = None
    ffn_hidden_size: int | None = None
    vocab_size: int = 384
    seq_length: int = 192
    position_embedding_type: str = "rope"
    normalization: str = "LayerNorm"
    swiglu: bool = False
    add_bias_linear: bool = True
    untie_embeddings_and_output_weights: bool = False
    rotary_base: int = 10000
    # Epsilon of every norm in the LM (LLaMA 1e-5 or 1e-6, Qwen2 1e-6).
    norm_epsilon: float = 1e-5
    # Biases on the q/k/v projection even when add_bias_linear is false (Qwen2).
    qkv_bias: bool = False
    # Llama-3 RoPE frequency scaling factor (None: no scaling); Megatron's rule with low/high frequency factors 1 / 4
    # and an original context of 8192 positions.
    rope_scaling_factor: float | None = None
    # The embedding and output layer hold ceil(vocab_size / (this * parallel.lm_tp)) * this * parallel.lm_tp rows;
    # rows past vocab_size are padding that generation never picks (Megatron's --make-vocab-size-divisible-by).
    make_vocab_size_divisible_by: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length")
        _check_positive(self, "ffn_hidden_size", "num_query_groups", "norm_epsilon", "rope_scaling_factor")
        _check_positive(self, "make_vocab_size_divisible_by", "rotary_base")
        _check_choice("model.lm.position_embedding_type", self.position_embedding_type, ("rope", "learned_absolute"))
        _check_choice("model.lm.normalization", self.normalization, ("LayerNorm", "RMSNorm"))
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.lm.hidden_size={self.hidden_size} must be divisible by "
                f"model.lm.num_attention_heads={self.num_attention_heads}"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"model.lm.num_query_groups={self.num_query_groups} must divide "
                f"model.lm.num_attention_heads={self.num_attention_heads}"
            )
        if self.rope_scaling_factor is not None and self.position_embedding_type != "rope":
            raise ValueError(
                f"model.lm.rope_scaling_factor={self.rope_scaling_factor} needs model.lm.position_embedding_type=rope"
            )

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Rows of the embedding and output layer: ``vocab_size`` rounded up to ``make_vocab_size_divisible_by*tp``."""
        unit = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // unit) * unit


VISION_ACTIVATIONS = ("gelu", "quick_gelu")


@dataclass
class VisionConfig:
    """CLIP ViT applied per frame, pooled to ``tokens_per_frame`` and projected to the LM width."""

    _path = "model.vision"
    backbone_type: str = "clip"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    patch_dim: int = 8
    img_size: int = 32
    num_frames: int = 4
    tokens_per_frame: int = 4
    projector_type: str = "mlp"
    projector_ffn_hidden_size: int | None = None
    # MLP activation of the ViT: "gelu" (erf) or "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP checkpoints).
    activation: str = "gelu"
    # Which hidden state feeds the projection, counted like Hugging Face's ``hidden_states``: -1 the last layer,
    # -2 the penultimate (LLaVA); only ``num_layers + 1 + feature_layer`` layers are built and run.
    feature_layer: int = -1
    # Drop the class token (LLaVA); when kept it is the first token of every frame (tokens_per_frame + 1 per frame).
    drop_class_token: bool = True
    layernorm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("model.vision.backbone_type", self.backbone_type, ("clip",))
        _check_choice("model.vision.activation", self.activation, VISION_ACTIVATIONS)
        _check_positive(self, "layernorm_epsilon")
        if not -self.num_layers <= self.feature_layer <= -1:
            raise ValueError(
                f"model.vision.feature_layer={self.feature_layer} must be within [-{self.num_layers}, -1] "
                f"(-1: last layer, -2: penultimate)"
            )
        _check_choice("model.vision.projector_type", self.projector_type, ("mlp", "affine"))
        _check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "patch_dim", "img_size")
        _check_positive(self, "num_frames", "tokens_per_frame", "ffn_hidden_size", "projector_ffn_hidden_size")
        if self.img_size % self.patch_dim:
            raise ValueError(
                f"model.vision.img_size={self.img_size} must be divisible by model.vision.patch_dim={self.patch_dim}"
            )
        grid = self.img_size // self.patch_dim
        side = round(self.tokens_per_frame**0.5)
        if side * side != self.tokens_per_frame or side > grid:
            raise ValueError(
                f"model.vision.tokens_per_frame={self.tokens_per_frame} must be a square number <= the patch grid "
                f"{grid}x{grid}={grid * grid}"
            )

    @property
    def grid(self) -> int:
        """Patches per side of a frame."""
        return self.img_size // self.patch_dim

    @property
    def built_layers(self) -> int:
        """Transformer layers actually built (the ones up to ``feature_layer``)."""
        return self.num_layers + 1 + self.feature_layer

    @property
    def tokens_out_per_frame(self) -> int:
        """Embedding rows one frame yields: the pooled patches plus the class token when it is kept."""
        return self.tokens_per_frame + (0 if self.drop_class_token else 1)


@dataclass
class AudioConfig:
    """Whisper-style (log-mel + convs) or BEATs-style (fbank patches) encoder, pooled to ``audio_seq_len``."""

    _path = "model.audio"
    backbone_type: str = "whisper"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None
    sample_rate: int = 16000
    clip_seconds: float = 2.0
    n_mels: int = 80
    hop_length: int = 160
    n_fft: int = 400
    fbank_bins: int = 128
    patch_size: int = 16
    audio_seq_len: int = 8
    projector_type: str = "mlp"
    projector_ffn_hidden_size: int | None = None
    layernorm_epsilon: float = 1e-5

    def __post_init__(self) -> None:
        _check_choice("model.audio.backbone_type", self.backbone_type, ("whisper", "beats"))
        _check_positive(self, "layernorm_epsilon")
        _check_choice("model.audio.projector_type", self.projector_type, ("mlp", "affine"))
        _check_positive(self, "num_layers", "hidden_size", "num_attention_heads", "sample_rate", "clip_seconds")
        _check_positive(self, "n_mels", "hop_length", "n_fft", "fbank_bins", "patch_size", "audio_seq_len")
        if self.audio_seq_len > self.max_audio_tokens:
            raise ValueError(
                f"model.audio.audio_seq_len={self.audio_seq_len} exceeds the {self.max_audio_tokens} positions the "
                f"{self.backbone_type} encoder produces for {self.clip_seconds} s of audio"
            )

    @property
    def num_samples(self) -> int:
        """Waveform samples per clip at ``sample_rate``."""
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def num_input_frames(self) -> int:
        """Spectrogram frames per clip (Whisper: centred STFT minus the last frame; BEATs: 25 ms / 10 ms Kaldi)."""
        if self.backbone_type == "whisper":
            return self.num_samples // self.hop_length
        win = int(0.025 * self.sample_rate)
        shift = int(0.010 * self.sample_rate)
        return 1 + (self.num_samples - win) // shift

    @property
    def max_audio_tokens(self) -> int:
        """Encoder sequence length before pooling."""
        if self.backbone_type == "whisper":
            return (self.num_input_frames - 1) // 2 + 1
        return (self.num_input_frames // self.patch_size) * (self.fbank_bins // self.patch_size)


OUTPUT_NAMES = ("image_out", "audio_out")


@dataclass
class ImageOutputConfig:
    """Image output: K generation-token hidden states → projection → conv upsampler → RGB ``[3, size, size]``."""

    _path = "model.outputs.image_out"
    enabled: bool = False
    # Id of the generation token (``<image_gen>`` in the byte tokenizer); its K hidden states condition the decoder.
    token_id: int = SPECIAL_TOKENS["<image_gen>"]
    # K: generation tokens per image.
    num_tokens: int = 4
    # Width the output projection maps each LM hidden state to.
    decoder_dim: int = 64
    # Output image side in pixels (a power of two >= 8).
    image_size: int = 64
    # Pixel loss ("l1" or "mse"), per image mean, weighted against the text cross-entropy.
    loss: str = "l1"
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("model.outputs.image_out.loss", self.loss, ("l1", "mse"))
        _check_positive(self, "num_tokens", "decoder_dim", "image_size")
        _check_positive(self, "loss_weight", allow_zero=True)
        size = self.image_size
        if size < 8 or size & (size - 1):
            raise ValueError(f"model.outputs.image_out.image_size={size} must be a power of two >= 8")


@dataclass
class AudioOutputConfig:
    """Audio output: K hidden states → projection → log-mel ``[n_mels, T]`` → Griffin-Lim waveform."""

    _path = "model.outputs.audio_out"
    enabled: bool = False
    # Id of the generation token (``<audio_gen>`` in the byte tokenizer).
    token_id: int = SPECIAL_TOKENS["<audio_gen>"]
    num_tokens: int = 4
    decoder_dim: int = 64
    sample_rate: int = 16000
    # Length of the generated clip.
    seconds: float = 0.5
    # 1024-point STFT and 128 mels: fine enough below 1 kHz to keep a tone's pitch through mel → Griffin-Lim.
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    # Griffin-Lim iterations when turning a generated mel into a waveform (inference only).
    griffin_lim_iters: int = 32
    # Mel loss ("l1" or "mse") on the log-mel, per clip mean, weighted against the text cross-entropy.
    loss: str = "l1"
    loss_weight: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("model.outputs.audio_out.loss", self.loss, ("l1", "mse"))
        _check_positive(self, "num_tokens", "decoder_dim", "sample_rate", "seconds", "n_fft", "hop_length")
        _check_positive(self, "n_mels", "griffin_lim_iters")
        _check_positive(self, "loss_weight", allow_zero=True)
        if self.n_mels > self.n_fft // 2 + 1:
            raise ValueError(
                f"model.outputs.audio_out.n_mels={self.n_mels} exceeds the n_fft // 2 + 1 = "
                f"{self.n_fft // 2 + 1} STFT bins"
            )

    @property
    def num_samples(self) -> int:
        """Waveform samples of a generated clip."""
        return int(round(self.seconds * self.sample_rate))

    @property
    def num_frames(self) -> int:
        """Mel frames of a clip (centred STFT)."""
        return self.num_samples // self.hop_length + 1


@dataclass
class OutputsConfig:
    """Multimodal outputs (the "Out" of MIMO); all off by default."""

    _path = "model.outputs"
    image_out: ImageOutputConfig = field(default_factory=ImageOutputConfig)
    audio_out: AudioOutputConfig = field(default_factory=AudioOutputConfig)

    def active(self) -> dict[str, ImageOutputConfig | AudioOutputConfig]:
        """``{name: config}`` of the enabled outputs, in :data:`OUTPUT_NAMES` order."""
        return {n: getattr(self, n) for n in OUTPUT_NAMES if getattr(self, n).enabled}


FREEZABLE = ("vision", "audio", "lm", "projections")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")


@dataclass
class ModelConfig:
    """The MIMO model: LM, encoders, attention backend, precision and the special tokens."""

    _path = "model"
    lm: LMConfig = field(default_factory=LMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    modalities: list[str] = field(default_factory=lambda: ["video", "audio"])
    special_token_ids: dict[str, int] = field(
        default_factory=lambda: {mod: SPECIAL_TOKENS[tag] for mod, tag in MODALITY_TAGS.items()}
    )
    attention_backend: str = "sdpa"
    # The LM's transformer layers: "local" (Megatron's local layers with model.attention_backend's core attention),
    # "transformer_engine" (Megatron's TE spec: fused layer-norm + linear, TE attention; needs transformer_engine
    # and CUDA), or "auto" = transformer_engine where it is importable and the model is built on CUDA, else local.
    transformer_impl: str = "auto"
    params_dtype: str = "fp32"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    recompute: bool = False
    outputs: OutputsConfig = field(default_factory=OutputsConfig)
    # Parts that do not train (staged training): any of vision, audio, lm, projections. A frozen encoder runs
    # forward-only under no_grad; frozen parts keep no optimizer state.
    freeze: list[str] = field(default_factory=list)
    # Where the weights came from (jobs/convert.py import): {"lm" | "vision" | "audio": local Hugging Face dir}.
    pretrained: dict[str, str] = field(default_factory=dict)
    # "package.module:function" returning the run's Megatron MimoModelConfig from the Config (user ModuleSpecs);
    # recorded with every checkpoint so resume, recovery and inference rebuild the same model. None: our specs.
    spec_factory: str | None = None
    # Embedding rows one item of a user modality yields (our modalities derive theirs from model.vision/audio); the
    # tokenizer expands the modality's tag to this many placeholder tokens.
    modality_tokens: dict[str, int] = field(default_factory=dict)
    # Tag of a user modality in a human turn (default "<name>"); ours are <video>, <audio>, <image>.
    modality_tags: dict[str, str] = field(default_factory=dict)

    def tag(self, modality: str) -> str:
        """The tag that stands for one item of ``modality`` in a human turn (``<video>``, ``<depth>``, ...)."""
        return MODALITY_TAGS.get(modality) or self.modality_tags.get(modality) or f"<{modality}>"

    def __post_init__(self) -> None:
        _check_choice("model.attention_backend", self.attention_backend, ("sdpa", "local", "te"))
        _check_choice("model.transformer_impl", self.transformer_impl, TRANSFORMER_IMPLS)
        if self.attention_backend == "te" and self.transformer_impl == "local":
            raise ValueError(
                "model.attention_backend='te' builds every layer from transformer-engine's spec, which contradicts "
                "model.transformer_impl='local'; use model.transformer_impl=auto or transformer_engine"
            )
        for part in self.freeze:
            _check_choice("model.freeze[]", part, (*FREEZABLE, *(m for m in self.modalities if m not in MODALITIES)))
        if self.spec_factory is not None and ":" not in self.spec_factory:
            raise ValueError(
                f"model.spec_factory={self.spec_factory!r} must be 'package.module:function' (a function of the Config "
                "returning a megatron.core.models.mimo.MimoModelConfig)"
            )
        for name, count in self.modality_tokens.items():
            if not isinstance(count, int) or count <= 0:
                raise ValueError(f"model.modality_tokens.{name}={count!r} must be a positive int")
        for part in self.pretrained:
            _check_choice("model.pretrained key", part, ("lm", "vision", "audio"))
        _check_choice("model.params_dtype", self.params_dtype, ("fp32", "bf16", "fp16"))
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"model.modalities={self.modalities} names a modality twice")
        for mod in self.modalities:
            if not isinstance(mod, str) or not _NAME_RE.match(mod) or mod == "text":
                raise ValueError(
                    f"model.modalities[]={mod!r} is not allowed; a modality name is an identifier other than 'text'"
                )
            if mod not in self.special_token_ids:
                raise ValueError(f"model.special_token_ids has no id for modality {mod!r}")
            tok = self.special_token_ids[mod]
            if not 0 <= tok < self.lm.vocab_size:
                raise ValueError(
                    f"model.special_token_ids.{mod}={tok} is outside the vocabulary [0, {self.lm.vocab_size})"
                )
        ids = [self.special_token_ids[m] for m in self.modalities]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model.special_token_ids must be distinct per modality, got {self.special_token_ids}")
        for name, out in self.outputs.active().items():
            if not 0 <= out.token_id < self.lm.vocab_size:
                raise ValueError(
                    f"model.outputs.{name}.token_id={out.token_id} is outside the vocabulary [0, {self.lm.vocab_size})"
                )
            if out.token_id in ids:
                raise ValueError(f"model.outputs.{name}.token_id={out.token_id} is also an input modality's token id")
        out_ids = [o.token_id for o in self.outputs.active().values()]
        if len(set(out_ids)) != len(out_ids):
            raise ValueError(f"model.outputs token ids must be distinct, got {out_ids}")


@dataclass
class DataConfig:
    """Manifests, decoding and batching."""

    _path = "data"
    data_path: str | None = None
    val_path: str | None = None
    # Roots for relative media paths of each field (LLaVA: image paths are relative to an image folder); unset =
    # the manifest's own folder. Absolute paths in a manifest are used as they are.
    image_folder: str | None = None
    video_folder: str | None = None
    audio_folder: str | None = None
    # How images and video frames become the encoder's square input: "pad" (LLaVA's expand2square: pad the short
    # side with the CLIP mean colour, then resize), "crop" (resize the short side, centre crop) or "stretch".
    image_aspect: str = "pad"
    tokenizer: str = "byte"
    # Chat template: None (the built-in "<bos><|user|>{human}<|assistant|>{answer}<eos>"), a template string or a
    # file holding one ({human}/{answer} placeholders, or a Hugging Face Jinja template), or "none" (raw text).
    chat_template: str | None = None
    micro_batch_size: int = 4
    global_batch_size: int = 8
    num_decode_workers: int = 2
    decode_timeout_s: float = 30.0
    decode_retries: int = 1
    # Later epochs in which a row whose decode hung or crashed (on all 1 + decode_retries tries) is tried again before
    # it is skipped for good; rows that failed for a deterministic reason are never decoded again.
    decode_retry_epochs: int = 1
    max_bad_fraction: float = 0.2
    # Decode functions of user modalities: {modality: "package.module:function"}, each row -> {encoder: {kwarg:
    # array [k, ...]}} for the row's k tags of it (mimo_ray/data/decode_hooks.py); run in the decode workers.
    decoders: dict[str, str] = field(default_factory=dict)
    shuffle: bool = True
    seed: int = 1234

    def __post_init__(self) -> None:
        _check_positive(self, "micro_batch_size", "global_batch_size", "num_decode_workers", "decode_timeout_s")
        _check_positive(self, "decode_retries", "decode_retry_epochs", allow_zero=True)
        _check_choice("data.image_aspect", self.image_aspect, ("pad", "crop", "stretch"))
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction} must be within [0, 1]")


@dataclass
class ParallelConfig:
    """Group sizes and placement of the disaggregated runtime."""

    _path = "parallel"
    lm_tp: int = 1
    lm_dp: int = 1
    encoder_dp: int = 1
    encoder_groups: str = "shared"
    transport: str = "auto"
    use_gpu: bool = False
    cpus_per_actor: float = 0.25
    placement_timeout_s: float = 60.0
    # GPUs per stage actor when use_gpu; a fraction lets an encoder and an LM actor share one GPU (CUDA IPC).
    gpus_per_actor: float = 1.0
    # Samples per LM micro-batch (None: data.micro_batch_size); encoder rows are re-split per sample to match.
    lm_micro_batch_size: int | None = None
    # Extra resources each encoder / LM actor's bundle asks for, e.g. {encoder_gpu: 1} to pin node types.
    encoder_resources: dict[str, float] = field(default_factory=dict)
    lm_resources: dict[str, float] = field(default_factory=dict)
    # Output decoders (model.outputs): "lm" runs them inside every LM rank; "group" runs them in their own actor
    # group (one actor, own placement group and world), fed the LM's generation-token states, returning their grads.
    decoder_placement: str = "lm"
    decoder_resources: dict[str, float] = field(default_factory=dict)
    # Custom resource that Ray Data decode tasks and the collate actor ask for: "auto" = cpu_decode (ray_cluster.yaml's
    # decode pool) when the cluster has it, else run anywhere; "none" = never; a name = always (autoscalers scale it).
    decode_resource: str = "auto"
    # Encoder forwards submitted ahead of their backward (1: forward of micro-batch i+1 overlaps LM work on i).
    prefetch_microbatches: int = 1
    # torch intra-op threads in every stage process (actors and the fused runtime); 1 keeps CPU runs bit-exact
    # between runtimes; 0 leaves torch's default.
    torch_num_threads: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "lm_tp", "lm_dp", "encoder_dp", "lm_micro_batch_size", "gpus_per_actor")
        _check_positive(self, "cpus_per_actor", "prefetch_microbatches", "torch_num_threads", allow_zero=True)
        _check_choice("parallel.encoder_groups", self.encoder_groups, ("shared", "per_modality"))
        _check_choice("parallel.transport", self.transport, ("auto", "object_store", "nccl", "cuda_ipc"))
        _check_choice("parallel.decoder_placement", self.decoder_placement, ("lm", "group"))
        for name in ("encoder_resources", "lm_resources", "decoder_resources"):
            for key, amount in getattr(self, name).items():
                if key in ("CPU", "GPU") or not isinstance(amount, int | float) or amount <= 0:
                    raise ValueError(
                        f"parallel.{name}.{key}={amount!r} is not allowed; custom resources need a positive amount "
                        f"and CPU/GPU come from parallel.cpus_per_actor / parallel.gpus_per_actor"
                    )
        if self.transport in ("nccl", "cuda_ipc") and not self.use_gpu:
            raise ValueError(f"parallel.transport={self.transport!r} needs parallel.use_gpu=true")


#: What ``train.init_from_modules`` may name (``model.freeze``'s parts plus the output decoders).
INIT_MODULES = ("vision", "audio", "projections", "lm", "decoders")
#: train.optimizer_impl choices (see TrainConfig).
OPTIMIZER_IMPLS = ("auto", "torch", "megatron")


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and recovery."""

    _path = "train"
    runtime: str = "disaggregated"
    max_steps: int = 20
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 2
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 1234
    output_dir: str = "runs/default"
    ckpt_interval: int = 0
    # Checkpoints of this run kept on disk, newest by step (0: all); another run's are never touched.
    keep_checkpoints: int = 3
    eval_interval: int = 0
    eval_batches: int = 4
    # Continue the run whose checkpoints are in output_dir (its run id, data position and a compatible config).
    resume: bool = False
    # Start afresh in an output_dir that holds another run's checkpoints, deleting them.
    overwrite: bool = False
    # Staged training (LLaVA stage 1 -> 2): a NEW run (own run id, step 0, fresh optimizer and LR schedule) whose
    # weights come from another run's checkpoint (a run dir, its checkpoints/ or a step_<N>; any runtime or TP size).
    init_from: str | None = None
    # Which parts to take from init_from: any of vision, audio, projections, lm, decoders ([]: all it holds).
    init_from_modules: list[str] = field(default_factory=list)
    # Recoveries after real failures (a dead actor or node, a lost object, a step that hangs with nothing pending).
    max_failures: int = 2
    # A step (or save) with no resource request pending in the cluster fails after this long.
    step_timeout_s: float = 300.0
    # Waiting for resources is not a failure: a recovery waits this long for its placement groups (an autoscaler
    # replacing a lost node), and a step whose tasks still wait for resources (a decode pool still busy) waits on up
    # to this long. Neither counts against max_failures.
    recovery_timeout_s: float = 1800.0
    # fp16 only (model.params_dtype=fp16): "dynamic" loss scaling (Megatron's rules) is required; bf16/fp32 ignore it.
    # The loss is a per-token *sum* (weight gradients already carry a factor of ~tokens per micro-batch), so the
    # scale starts small; overflowing steps are skipped and halve it, 1000 clean steps double it.
    loss_scaling: str = "dynamic"
    initial_loss_scale: float = 16.0
    loss_scale_window: int = 1000
    # Which optimizer steps the stages (the same AdamW arithmetic either way): "auto" = Megatron's
    # DistributedDataParallel + DistributedOptimizer (fp32 grad buckets reduce-scattered over DP, fp32 master weights
    # and Adam moments sharded over DP) on CUDA stages, mimo_ray's replicated optimizer on CPU; "torch" = mimo_ray's
    # optimizer everywhere (fused AdamW on CUDA); "megatron" = Megatron's everywhere (CUDA only: megatron-core 0.16.1
    # allocates its optimizer on "cuda"). Checkpoints of the two differ: refused on resume.
    optimizer_impl: str = "auto"
    # optimizer_impl=megatron only: gradient elements per reduce-scatter bucket (0: Megatron's default,
    # max(40M, 1M * DP)).
    grad_bucket_size: int = 0

    def __post_init__(self) -> None:
        _check_choice("train.runtime", self.runtime, ("disaggregated", "fused"))
        _check_choice("train.loss_scaling", self.loss_scaling, ("dynamic", "none"))
        _check_choice("train.optimizer_impl", self.optimizer_impl, OPTIMIZER_IMPLS)
        _check_positive(self, "grad_bucket_size", allow_zero=True)
        _check_positive(self, "initial_loss_scale", "loss_scale_window")
        _check_positive(self, "max_steps", "lr", "step_timeout_s", "recovery_timeout_s")
        _check_positive(self, "min_lr", "warmup_steps", "weight_decay", "grad_clip", allow_zero=True)
        _check_positive(self, "ckpt_interval", "keep_checkpoints", "eval_interval", "max_failures", allow_zero=True)
        if self.resume and self.overwrite:
            raise ValueError("train.resume and train.overwrite exclude each other; pass --resume or --overwrite")
        if self.min_lr > self.lr:
            raise ValueError(
                f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}: the cosine schedule would rise after warm-up; "
                "set --train.min_lr (LLaVA decays to 0: --train.min_lr=0)"
            )
        for part in self.init_from_modules:
            _check_choice("train.init_from_modules[]", part, INIT_MODULES)
        if self.init_from_modules and not self.init_from:
            raise ValueError("train.init_from_modules is set but train.init_from is not; pass --init-from CHECKPOINT")


@dataclass
class InferConfig:
    """Batched generation."""

    _path = "infer"
    checkpoint: str | None = None
    output: str = "preds.jsonl"
    batch_size: int = 8
    max_new_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "max_new_tokens")
        _check_positive(self, "temperature", allow_zero=True)
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"infer.top_p={self.top_p} must be within (0, 1]")


@dataclass
class ClusterConfig:
    """How to reach Ray: an existing cluster (RAY_ADDRESS / ``address``) or an embedded local instance."""

    _path = "cluster"
    address: str | None = None
    num_cpus: int | None = None
    object_store_memory_mb: int = 512

    def init_kwargs(self) -> dict[str, Any]:
        """Arguments for ``ray.init``: resources only when starting an embedded instance (NOTES §6)."""
        address = self.address or os.environ.get("RAY_ADDRESS")
        if address:
            return {"address": address}
        kwargs: dict[str, Any] = {
            # "local": always a new embedded instance, never a `ray start` cluster that happens to run on this host
            # (it would reject the resource arguments); attach to one with cluster.address=auto / RAY_ADDRESS.
            "address": "local",
            "include_dashboard": False,
            "object_store_memory": self.object_store_memory_mb * 1024 * 1024,
        }
        if self.num_cpus is not None:
            kwargs["num_cpus"] = self.num_cpus
        return kwargs


@dataclass
class Config:
    """The whole tree; ``preset`` records which preset it came from."""

    _path = ""
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def __post_init__(self) -> None:
        if self.model.params_dtype == "fp16" and self.train.loss_scaling != "dynamic":
            raise ValueError(
                "model.params_dtype=fp16 needs train.loss_scaling=dynamic (fp16 gradients underflow without a loss "
                f"scale), got train.loss_scaling={self.train.loss_scaling!r}; use model.params_dtype=bf16 instead"
            )
        cpu_stages = self.train.runtime == "disaggregated" and not self.parallel.use_gpu
        if self.train.optimizer_impl == "megatron" and cpu_stages:
            raise ValueError(
                "train.optimizer_impl=megatron needs CUDA stages (parallel.use_gpu=true): megatron-core 0.16.1's "
                "DistributedOptimizer allocates on 'cuda'; use train.optimizer_impl=auto or torch on CPU"
            )
        if self.model.lm.num_attention_heads % self.parallel.lm_tp:
            raise ValueError(
                f"parallel.lm_tp={self.parallel.lm_tp} must divide model.lm.num_attention_heads="
                f"{self.model.lm.num_attention_heads}"
            )
        dp_batch = self.data.micro_batch_size * self.parallel.lm_dp
        if self.data.global_batch_size % dp_batch:
            raise ValueError(
                f"data.global_batch_size={self.data.global_batch_size} must be a multiple of "
                f"data.micro_batch_size * parallel.lm_dp = {dp_batch}"
            )
        if self.data.global_batch_size % (self.data.micro_batch_size * self.parallel.encoder_dp):
            raise ValueError(
                f"data.global_batch_size={self.data.global_batch_size} must be a multiple of "
                f"data.micro_batch_size * parallel.encoder_dp"
            )

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per LM data-parallel rank per optimizer step."""
        return self.data.global_batch_size // (self.data.micro_batch_size * self.parallel.lm_dp)
