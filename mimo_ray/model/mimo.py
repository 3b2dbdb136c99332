"""``MimoRayModel``: Megatron's ``MimoModel`` with strict alignment, per-part deterministic initialisation, and
the encoder half / language-model half exposed separately so the disaggregated runtime runs the same code.

Per-part seeding means an encoder group and an LM group that build only their half get exactly the weights the
fused model has, on any device and any TP size (Megatron's CPU initialisation slices one master weight).
"""

from __future__ import annotations

import inspect
import warnings
import zlib
from typing import Any

import torch
from megatron.core.models.mimo import MimoModel, MimoModelConfig
from megatron.core.transformer.spec_utils import ModuleSpec, build_module

from mimo_ray.config import ModelConfig
from mimo_ray.model.align import align_embeddings
from mimo_ray.model.decoders import OutputDecoders, gather_generation_rows

warnings.filterwarnings("ignore", message=".*experimental and still under active development.*")


def part_seed(seed: int, part: str) -> int:
    """Seed for one model part (``language_model`` or a modality name), stable across processes."""
    return (seed * 1_000_003 + zlib.crc32(part.encode())) % (2**31)


def build_part(spec: ModuleSpec, seed: int, part: str) -> torch.nn.Module:
    """Build one part (a modality submodule or the language model) under its own seed, leaving the caller's RNG.

    Args:
        spec: the part's ``ModuleSpec``.
        seed: the model seed.
        part: ``language_model`` or the modality name.

    Returns:
        The module.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(part_seed(seed, part))
        if hasattr(spec.module, "from_spec"):
            return spec.module.from_spec(spec)
        return build_module(spec)


def _required_kwargs(module: torch.nn.Module) -> list[str]:
    """Parameters of ``module.forward`` without a default (what an encoder cannot run without)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def check_encoder_inputs(name: str, submodule: torch.nn.Module, inputs: Any) -> None:
    """Raise before running a modality whose inputs miss an encoder or one of its arguments.

    Args:
        name: the modality.
        submodule: its ``ModalitySubmodules`` (its ``encoders`` ModuleDict is checked when it has one).
        inputs: ``modality_inputs[name]`` = ``{encoder_name: {kwarg: tensor}}``.

    Raises:
        ValueError: naming the modality, the encoder and the missing kwarg (and what was given).
    """
    if not isinstance(inputs, dict):
        raise ValueError(f"modality_inputs[{name!r}] must be {{encoder name: {{kwarg: tensor}}}}, got {type(inputs)}")
    encoders = getattr(submodule, "encoders", None)
    if not isinstance(encoders, torch.nn.ModuleDict):
        return
    for enc_name, encoder in encoders.items():
        if enc_name not in inputs:
            raise ValueError(
                f"modality {name!r}: no inputs for encoder {enc_name!r} (modality_inputs[{name!r}] has "
                f"{sorted(inputs)})"
            )
        given = inputs[enc_name]
        if not isinstance(given, dict):
            raise ValueError(f"modality {name!r}, encoder {enc_name!r}: inputs must be {{kwarg: tensor}}")
        missing = [k for k in _required_kwargs(encoder) if k not in given]
        if missing:
            raise ValueError(
                f"modality {name!r}, encoder {enc_name!r}: missing input {missing[0]!r} "
                f"(modality_inputs[{name!r}][{enc_name!r}] has {sorted(given)})"
            )
    extra = [k for k in inputs if k not in encoders]
    if extra:
        raise ValueError(f"modality {name!r}: inputs for unknown encoders {extra} (the spec has {list(encoders)})")


def encode_modalities(
    submodules: torch.nn.ModuleDict,
    modality_inputs: dict[str, dict[str, dict[str, Any]]] | None,
    known: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Run every modality submodule that has inputs.

    Args:
        submodules: ``{modality: ModalitySubmodules}``.
        modality_inputs: ``{modality: {encoder_name: {kwarg: tensor}}}`` (C1).
        known: every modality of the model (``None``: those of ``submodules``); inputs of any other raise.

    Returns:
        ``{modality: [N_tokens, H_lm]}`` projected embeddings, batch-major rows.

    Raises:
        ValueError: inputs for a modality the model lacks, or for a missing encoder or argument (naming them).
    """
    known_names = list(submodules) if known is None else list(known)
    unknown = [m for m in (modality_inputs or {}) if m not in known_names and modality_inputs[m] is not None]
    if unknown:
        raise ValueError(
            f"the batch has modality_inputs for {unknown}, which the model's modality_submodules_spec lacks "
            f"(it has {known_names})"
        )
    out: dict[str, torch.Tensor] = {}
    for name, submodule in submodules.items():
        if modality_inputs and modality_inputs.get(name) is not None:
            check_encoder_inputs(name, submodule, modality_inputs[name])
            emb = submodule(encoder_inputs=modality_inputs[name])
            if emb is not None:
                out[name] = emb
    return out


class MimoRayModel(MimoModel):
    """A ``MimoModel`` whose forward raises on placeholder/embedding mismatches (C2) and can run in halves.

    Args:
        mimo_config: upstream config (language model spec, modality specs, special token ids).
        init_seed: seed of the per-part initialisation.
        model_cfg: when given and ``model_cfg.outputs`` enables outputs, the output decoders are built beside the
            language model (``self.output_decoders``, seeded as their own part); otherwise there is no such module.
    """

    def __init__(self, mimo_config: MimoModelConfig, init_seed: int = 1234, model_cfg: ModelConfig | None = None):
        self.init_seed = init_seed
        super().__init__(mimo_config)
        self.output_decoders: OutputDecoders | None = None
        #: ``{output name: generation token id}`` (kept when the decoders run elsewhere, see ``drop_decoders``).
        self.generation_token_ids: dict[str, int] = {}
        #: Real vocabulary size: logits past it are padding (``model.lm.make_vocab_size_divisible_by``).
        self.text_vocab_size: int | None = model_cfg.lm.vocab_size if model_cfg is not None else None
        if model_cfg is not None and model_cfg.outputs.active():
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(part_seed(init_seed, "output_decoders"))
                self.output_decoders = OutputDecoders(model_cfg)
            self.generation_token_ids = self.output_decoders.token_ids

    def _initialize_submodules(self) -> None:
        for name, spec in self.mimo_config.modality_submodules_spec.items():
            self.modality_submodules[name] = build_part(spec, self.init_seed, name)

    def _initialize_language_model(self) -> None:
        self.language_model = build_part(self.mimo_config.language_model_spec, self.init_seed, "language_model")

    def align_embeddings_by_token_positions(
        self, modality_embeddings: dict[str, torch.Tensor], input_ids: torch.Tensor, special_token_ids: dict[str, int]
    ) -> torch.Tensor:
        """Strict version of upstream's alignment, see :func:`~mimo_ray.model.align.align_embeddings`."""
        return align_embeddings(modality_embeddings, input_ids, special_token_ids)

    def encode(self, modality_inputs: dict[str, dict[str, dict[str, Any]]] | None) -> dict[str, torch.Tensor]:
        """Encoder half: ``{modality: [N_tokens, H_lm]}``."""
        return encode_modalities(self.modality_submodules, modality_inputs, known=list(self.special_token_ids))

    def forward_lm(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        modality_embeddings: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_targets: dict[str, torch.Tensor] | None = None,
    ) -> Any:
        """Language-model half.

        Args:
            input_ids: ``[B, S]``.
            position_ids: ``[B, S]``.
            modality_embeddings: ``{modality: [N_tokens, H]}`` from :meth:`encode` (or from encoder actors).
            labels: ``[B, S]`` targets; ``None`` for logits.
            attention_mask: optional Megatron mask (``True`` = masked), ``[B, 1, S, S]``.
            output_targets: ``{output name: [N, ...]}`` decoder targets of the samples holding that output's
                generation tokens (batch-major); only with enabled ``model.outputs``.

        Returns:
            Per-token loss ``[B, S]`` with labels, else logits ``[B, S, V]``; with ``output_targets`` the pair
            ``(that, {output name: weighted decoder loss sum})``.
        """
        if output_targets is None:
            return self._run_lm(input_ids, position_ids, modality_embeddings, labels, attention_mask)
        result, rows = self.forward_lm_rows(input_ids, position_ids, modality_embeddings, labels, attention_mask)
        return result, self.output_decoders.loss_sums(rows, output_targets)

    def forward_lm_rows(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        modality_embeddings: dict[str, torch.Tensor],
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Like :meth:`forward_lm`, plus the final-norm hidden states at the generation tokens.

        Returns:
            ``(loss [B, S] or logits [B, S, V], {output name: [N*K, H]})`` (rows batch-major, C2 order).

        Raises:
            ValueError: no output is enabled in ``model.outputs``.
        """
        if not self.generation_token_ids:
            raise ValueError("model.outputs enables no output, so there are no generation-token hidden states")
        captured: list[torch.Tensor] = []
        # The TransformerBlock applies the final norm; its output is exactly what the output layer reads.
        handle = self.language_model.decoder.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            result = self._run_lm(input_ids, position_ids, modality_embeddings, labels, attention_mask)
        finally:
            handle.remove()
        hidden_SBH = captured[-1][0] if isinstance(captured[-1], tuple) else captured[-1]
        return result, gather_generation_rows(hidden_SBH, input_ids, self.generation_token_ids)

    def drop_decoders(self) -> None:
        """Remove the output decoders (they run in their own actor group); the generation rows stay available."""
        self.output_decoders = None

    def _run_lm(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        modality_embeddings: dict[str, torch.Tensor],
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        text = self.get_text_embeddings(input_ids, position_ids, self.special_token_ids)
        decoder_input = self.align_embeddings_by_token_positions(
            {**modality_embeddings, "text": text}, input_ids, self.special_token_ids
        )  # [S, B, H]
        return self.language_model(
            input_ids=None,
            position_ids=None,
            decoder_input=decoder_input,
            labels=labels,
            attention_mask=attention_mask,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        modality_inputs: dict[str, dict[str, dict[str, Any]]] | None = None,
        output_targets: dict[str, torch.Tensor] | None = None,
    ) -> tuple[Any, ...]:
        """Fused step, same contract as upstream ``MimoModel.forward`` (C1).

        Returns:
            ``(per-token loss [B, S] or logits [B, S, V], loss_mask)``; the mask is returned unapplied. With
            ``output_targets`` (enabled ``model.outputs``) a third item ``{output name: weighted decoder loss
            sum}``: the step's loss is ``(sum(loss * mask) + sum of those) / sum(mask)``.
        """
        embeddings = self.encode(modality_inputs)
        if output_targets is None:
            return self.forward_lm(input_ids, position_ids, embeddings, labels, attention_mask), loss_mask
        loss, out_losses = self.forward_lm(input_ids, position_ids, embeddings, labels, attention_mask, output_targets)
        return loss, loss_mask, out_losses
