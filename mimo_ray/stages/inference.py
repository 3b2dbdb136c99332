"""Inference verbs of the stages (plain Python): encoders forward-only on prompt batches, LM generation with a KV
cache, and loading weights from any training checkpoint layout.

    enc = EncoderInferStage(cfg, ["video", "audio"]); enc.setup(); enc.load_weights(ckpt)
    lm = LanguageInferStage(cfg); lm.setup(); lm.load_weights(ckpt)
    enc.set_data_iterator(prompt_batches)
    out = lm.generate(enc.encode_next())      # {"ids", "tokens", "num_generated", ...} or None at the end
    media = lm.decode_outputs(input_ids)      # output tasks: {"image_out": [n, 3, S, S], "audio_out": [n, L]}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mimo_ray.model import build_lm_part, encode_modalities
from mimo_ray.model.generate import generate
from mimo_ray.model.output_generate import decode_generation
from mimo_ray.parallel.imported_layout import is_imported, load_imported
from mimo_ray.parallel.layer_layout import match_module
from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.encoder import EncoderStage
from mimo_ray.stages.fused import FusedStage
from mimo_ray.stages.language import LanguageStage
from mimo_ray.stages.payload import pack, unpack

EOS_ID = 258
PAD_ID = 256
# Per-sample fields a prompt batch carries through to the output rows unchanged.
PASSTHROUGH = ("ids", "answers", "meta")


def full_state_from_checkpoint(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """Every parameter of a TP=1 checkpoint under the fused model's names, whatever runtime wrote it.

    Args:
        ckpt: a complete ``step_<N>`` directory.

    Returns:
        ``{fused name: tensor}``.

    Raises:
        ValueError: no model files, or tensor-parallel shards (TP > 1 checkpoints load only into the same layout).
    """
    ckpt = Path(ckpt)
    files = sorted(ckpt.glob("*/tp*.pt"))
    if not files:
        raise ValueError(f"checkpoint {str(ckpt)!r} holds no model files (<role>/tp<k>.pt)")
    if any(f.name != "tp0.pt" for f in files):
        raise ValueError(f"checkpoint {str(ckpt)!r} is tensor-parallel; load it with the same parallel.lm_tp")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        model = torch.load(file, map_location="cpu", weights_only=True)["model"]
        role = file.parent.name
        prefix = {"encoder": "modality_submodules.", "decoders": "output_decoders."}.get(role.split("-")[0], "")
        state.update({prefix + k: v for k, v in model.items()})
    return state


def load_weights(stage: Stage, ckpt: str | Path) -> None:
    """Load model weights (no optimizer) into a stage from its own file, or from any TP=1 layout.

    Raises:
        ValueError: missing or mismatching parameters, naming the checkpoint.
    """
    own = Path(ckpt) / stage.role / f"tp{stage.tp_rank}.pt"
    if not own.exists() and is_imported(ckpt):
        load_imported(stage.module, ckpt, stage.name_prefix, stage.tp_rank, stage.tp)
        stage.module.eval()
        return
    if own.exists():
        model = torch.load(own, map_location=stage.device, weights_only=True)["model"]
        decoders = Path(ckpt) / "decoders" / "tp0.pt"
        if isinstance(stage, LanguageInferStage) and decoders.exists():  # trained with parallel.decoder_placement=group
            state = torch.load(decoders, map_location=stage.device, weights_only=True)["model"]
            model.update({f"output_decoders.{k}": v for k, v in state.items()})
    else:
        full = full_state_from_checkpoint(ckpt)
        prefix = stage.name_prefix
        model = {k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}
        if isinstance(stage, LanguageInferStage):
            model = {k: v for k, v in full.items() if k.startswith(("language_model.", "output_decoders."))}
    result = stage.module.load_state_dict(match_module(model, list(stage.module.state_dict())), strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"checkpoint {ckpt}: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    stage.module.eval()


def _generate(model: Any, tokens: dict, emb: dict, params: dict) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
    result = generate(
        model,
        tokens["input_ids"],
        tokens["prompt_lengths"],
        emb,
        max_new_tokens=int(params["max_new_tokens"]),
        eos_id=params.get("eos_id", EOS_ID),
        pad_id=params.get("pad_id", PAD_ID),
        temperature=float(params.get("temperature", 0.0)),
        top_p=float(params.get("top_p", 1.0)),
        generator=gen,
        use_cache=bool(params.get("use_cache", True)),
    )
    return {
        "tokens": result.tokens,
        "finished": result.finished,
        "num_prompt_tokens": result.num_prompt_tokens,
        "num_generated_tokens": result.num_generated_tokens,
    }


def _decode_outputs(stage: Stage, input_ids: Any) -> dict[str, Any]:
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=stage.device)
    return {name: value.cpu().numpy() for name, value in decode_generation(stage.module, ids).items()}


class EncoderInferStage(EncoderStage):
    """An encoder rank that reads prompt batches itself and returns their embeddings (no graph kept)."""

    trains = False

    @stage_call
    def load_weights(self, ckpt: str) -> None:
        load_weights(self, ckpt)

    @stage_call
    def encode_next(self) -> dict[str, Any] | None:
        """Encode the next prompt batch of this rank's stream.

        Returns:
            ``{"tokens": {"input_ids" [B, S], "prompt_lengths" [B]}, "emb": {modality: [N, H]}, "ids", …}``
            packed for transport, or ``None`` when the stream is exhausted.
        """
        batch = next(self._data, None) if self._data is not None else None
        if batch is None:
            return None
        extra = {k: batch[k] for k in PASSTHROUGH if k in batch}
        batch = unpack({k: v for k, v in batch.items() if k not in PASSTHROUGH}, self.device)
        inputs = batch.get("modality_inputs") or {}
        with torch.no_grad():
            emb = encode_modalities(self.module, inputs, known=self.cfg.model.modalities)
        tokens = {"input_ids": batch["input_ids"], "prompt_lengths": batch["prompt_lengths"]}
        return {**extra, **pack({"tokens": tokens, "emb": emb}, self.payload_format)}


class LanguageInferStage(LanguageStage):
    """An LM rank that generates for encoded prompt batches (every TP rank of a DP rank gets the same call)."""

    trains = False

    def build_module(self) -> torch.nn.Module:
        # Output decoders always beside the LM for inference (no backward to route).
        return build_lm_part(self.cfg, self.spec)

    @stage_call
    def load_weights(self, ckpt: str) -> None:
        load_weights(self, ckpt)

    @stage_call
    def generate(self, encoded: dict[str, Any] | None, params: dict[str, Any]) -> dict[str, Any] | None:
        """Generate for one encoded prompt batch.

        Args:
            encoded: the output of :meth:`EncoderInferStage.encode_next` (``None`` passes through).
            params: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``eos_id``, ``pad_id``, ``use_cache``.

        Returns:
            ``{"ids", "answers", "meta", "tokens": [[int]], "finished", "num_prompt_tokens",
            "num_generated_tokens"}`` or ``None``.
        """
        if encoded is None:
            return None
        data = unpack({"tokens": encoded["tokens"], "emb": encoded["emb"]}, self.device)
        out = _generate(self.module, data["tokens"], data["emb"], params)
        return {**{k: encoded[k] for k in PASSTHROUGH if k in encoded}, **out}

    @stage_call
    def decode_outputs(self, input_ids: Any) -> dict[str, Any]:
        """Output tasks: prompts ending in generation tokens ``[B, S]`` → decoded media (numpy), batch-major
        (:func:`~mimo_ray.model.output_generate.decode_generation`); every TP rank of a DP rank gets the call.
        """
        return _decode_outputs(self, input_ids)


class FusedInferStage(FusedStage):
    """Encoders and LM in one process: the ``fused`` inference runtime and the one-process baseline."""

    trains = False

    @stage_call
    def load_weights(self, ckpt: str) -> None:
        load_weights(self, ckpt)

    @stage_call
    def generate_batch(self, batch: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Encode and generate for one prompt batch (same output as :meth:`LanguageInferStage.generate`)."""
        extra = {k: batch[k] for k in PASSTHROUGH if k in batch}
        data = unpack({k: v for k, v in batch.items() if k not in PASSTHROUGH}, self.device)
        with torch.no_grad():
            emb = self.module.encode(data.get("modality_inputs"))
        tokens = {"input_ids": data["input_ids"], "prompt_lengths": data["prompt_lengths"]}
        return {**extra, **_generate(self.module, tokens, emb, params)}

    @stage_call
    def decode_outputs(self, input_ids: Any) -> dict[str, Any]:
        """Same as :meth:`LanguageInferStage.decode_outputs`, in this process."""
        return _decode_outputs(self, input_ids)
