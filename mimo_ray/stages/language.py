"""Language-model stage: one (TP rank, DP rank) of the LM group, plain Python.

Per LM micro-batch ``forward_backward`` joins the pieces that encoder ranks sent (tokens + embedding rows of
consecutive samples), aligns the embeddings at their placeholders (C2), runs Megatron's GPTModel, backpropagates
``sum(loss * loss_mask)`` and returns the gradient of every embedding row, cut into the same pieces.

    stage = LanguageStage(cfg, rank=0, world_size=1); stage.setup()
    stats, grad = stage.forward_backward(0, 1, {"tokens": {...}, "emb": {"video": e_NH}})
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.model import build_lm_part
from mimo_ray.model.freeze import trainable_modalities
from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.payload import (
    concat_rows,
    concat_targets,
    concat_tokens,
    loss_stats,
    pack,
    rows_per_sample,
    unpack,
)


class LanguageStage(Stage):
    """Megatron GPTModel (text embeddings, alignment, decoder, loss) on one rank of the LM group.

    Args:
        cfg: the whole config.
        rank: rank in the LM group's world (``tp * dp`` actors; TP ranks are consecutive).
        world_size: ``parallel.lm_tp * parallel.lm_dp``.
        role: group name.
        spec: the run's ``MimoModelConfig`` (``None``: built from ``cfg``); this stage builds its language model.
    """

    def __init__(self, cfg: Config, *, rank: int = 0, world_size: int = 1, role: str = "lm", spec: Any = None):
        super().__init__(cfg, role=role, rank=rank, world_size=world_size, tp=cfg.parallel.lm_tp, spec=spec)
        self._trainable = set(trainable_modalities(cfg.model))

    def build_module(self) -> torch.nn.Module:
        module = build_lm_part(self.cfg, self.spec)
        if self.cfg.parallel.decoder_placement == "group":
            module.drop_decoders()  # they run in the decoder group (forward_rows / backward_rows)
        self._graphs: dict[Any, tuple] = {}
        return module

    def _join(self, num_groups: int, payloads: tuple[Any, ...]) -> tuple[dict, dict, list[list[str]], list[dict]]:
        """Pieces (``num_groups`` payloads each, group 0 holding the tokens) → one batch.

        Returns:
            ``(tokens {key: [B, S]}, embeddings {modality: [N, H]}, modalities per group, per-piece tokens)``.
        """
        if not payloads or len(payloads) % num_groups:
            raise ValueError(f"{len(payloads)} payloads cannot be split into pieces of {num_groups} groups")
        pieces = [
            [unpack(payloads[p * num_groups + g], self.device) for g in range(num_groups)]
            for p in range(len(payloads) // num_groups)
        ]
        piece_tokens = [piece[0]["tokens"] for piece in pieces]
        groups = [sorted(pieces[0][g]["emb"]) for g in range(num_groups)]
        emb = concat_rows([{k: v for part in piece for k, v in part["emb"].items()} for piece in pieces])
        tokens = concat_tokens(piece_tokens)
        targets = concat_targets([piece[0].get("targets") or {} for piece in pieces])
        if targets is not None:
            tokens["output_targets"] = targets
        return tokens, emb, groups, piece_tokens

    def _loss(self, tokens: dict, emb: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        targets = tokens.get("output_targets")
        if targets is None:
            loss_BS = self.module.forward_lm(tokens["input_ids"], tokens["position_ids"], emb, tokens["labels"])
            mask_BS = tokens["loss_mask"].to(loss_BS.dtype)
            return (loss_BS * mask_BS).sum(), mask_BS.sum(), {}
        loss_sum, num_tokens, rows = self._text_and_rows(tokens, emb)
        out_losses = self.module.output_decoders.loss_sums(rows, targets)
        for value in out_losses.values():
            loss_sum = loss_sum + value  # decoder losses share the text loss's global token normalisation
        return loss_sum, num_tokens, out_losses

    @stage_call
    def forward_backward(self, key: Any, num_groups: int, *payloads: Any, return_grads: bool = True) -> list[Any]:
        """Forward and backward of one LM micro-batch; gradients accumulate until the optimizer step.

        Args:
            key: micro-batch id (for errors and logs).
            num_groups: encoder groups; ``payloads`` holds ``num_groups`` consecutive payloads per piece.
            *payloads: per piece, per group: ``{"emb": {modality: [N_piece, H]}}`` (+ ``"tokens"`` from group 0),
                pieces in sample order.
            return_grads: return stats and embedding gradients (TP rank 0); other TP ranks return ``[None]``.

        Returns:
            ``[stats, grad payload per piece per group…]`` where stats is ``{"loss_sum", "num_tokens",
            "num_samples"}`` and a grad payload is ``{modality: [N_piece, H]}`` for that group's modalities.
        """
        self._begin_step()
        tokens, emb, groups, piece_tokens = self._join(num_groups, payloads)
        emb = {name: rows.requires_grad_(name in self._trainable) for name, rows in emb.items()}
        loss_sum, num_tokens, parts = self._loss(tokens, emb)
        self.backward_loss(loss_sum)
        stats = loss_stats(loss_sum, num_tokens, tokens["input_ids"].shape[0], parts)
        if not return_grads:
            return [None]
        return [stats, *self._grad_pieces(emb, groups, piece_tokens)]

    def _grad_pieces(self, emb: dict, groups: list[list[str]], piece_tokens: list[dict]) -> list[Any]:
        """The gradient of every embedding row, cut into the pieces (and groups) they came in."""
        ids = self.cfg.model.special_token_ids
        outputs: list[Any] = []
        first = dict.fromkeys(emb, 0)
        for part in piece_tokens:
            rows = {name: sum(rows_per_sample(part["input_ids"], ids[name])) for name in emb}
            for mods in groups:
                grad = {}
                for name in mods:
                    if name not in self._trainable:
                        continue  # a frozen modality (encoder and projection): no gradient crosses back
                    full = emb[name].grad if emb[name].grad is not None else torch.zeros_like(emb[name])
                    grad[name] = full[first[name] : first[name] + rows[name]]
                outputs.append(pack(grad, self.payload_format))
            for name in emb:
                first[name] += rows[name]
        return outputs

    # ----- decoder-group layout (parallel.decoder_placement=group) --------------------------------------------------
    def _text_and_rows(self, tokens: dict, emb: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        args = (tokens["input_ids"], tokens["position_ids"], emb, tokens["labels"])
        loss_BS, rows = self.module.forward_lm_rows(*args)
        mask_BS = tokens["loss_mask"].to(loss_BS.dtype)
        return (loss_BS * mask_BS).sum(), mask_BS.sum(), rows

    @stage_call
    def forward_rows(self, key: Any, num_groups: int, *payloads: Any, train: bool = True) -> list[Any]:
        """Phase 1 of an LM micro-batch whose output decoders run in their own group: the text loss and the
        final-norm hidden states at the generation tokens; the graph is kept under ``key`` for :meth:`backward_rows`.

        Args: as :meth:`forward_backward`; ``train=False`` keeps no graph (evaluation).

        Returns:
            ``[text stats, {"rows": {output: [N*K, H]}, "targets": {output: [N, ...]}}]`` (same on every TP rank).
        """
        if train:
            self._begin_step()
        tokens, emb, groups, piece_tokens = self._join(num_groups, payloads)
        size = tokens["input_ids"].shape[0]
        with torch.set_grad_enabled(train):
            emb = {name: rows.requires_grad_(train and name in self._trainable) for name, rows in emb.items()}
            loss_sum, num_tokens, rows = self._text_and_rows(tokens, emb)
        if train:
            self._graphs[key] = (loss_sum, num_tokens, rows, emb, groups, piece_tokens, size)
        payload = {"rows": {n: r.detach() for n, r in rows.items()}, "targets": tokens.get("output_targets") or {}}
        return [loss_stats(loss_sum, num_tokens, size), pack(payload, self.payload_format)]

    @stage_call
    def backward_rows(self, key: Any, parts: dict[str, float], grad_rows: Any, return_grads: bool = True) -> list[Any]:
        """Phase 2: backward of ``text loss + decoder losses`` from the decoder group's ``d loss / d rows``.

        Args:
            key: the micro-batch given to :meth:`forward_rows`.
            parts: ``{output: weighted decoder loss sum}`` from the decoder group.
            grad_rows: ``{output: [N*K, H]}`` gradients of the rows.
            return_grads: as :meth:`forward_backward`.

        Returns:
            Exactly what :meth:`forward_backward` returns (stats include the decoder losses).
        """
        if key not in self._graphs:
            raise KeyError(f"no forward graph for LM micro-batch {key!r}")
        loss_sum, num_tokens, rows, emb, groups, piece_tokens, size = self._graphs.pop(key)
        grads = unpack(grad_rows, self.device)
        names = [n for n in rows if n in grads and rows[n].requires_grad]
        outputs = [loss_sum, *(rows[n] for n in names)]
        # The rows' gradients came back already multiplied by the (fp16) loss scale.
        seed = torch.full_like(loss_sum, self.loss_scale)
        torch.autograd.backward(outputs, [seed, *(grads[n] for n in names)])
        if not return_grads:
            return [None]
        part_t = {n: torch.tensor(v, dtype=torch.float64) for n, v in parts.items()}
        total = loss_sum.detach().double() + sum(part_t.values(), torch.zeros((), dtype=torch.float64))
        return [loss_stats(total, num_tokens, size, part_t), *self._grad_pieces(emb, groups, piece_tokens)]

    @stage_call
    def forward_only(self, key: Any, num_groups: int, *payloads: Any) -> list[dict[str, float]]:
        """Evaluation: the stats of one LM micro-batch without gradients (same arguments as forward_backward)."""
        tokens, emb, _, _ = self._join(num_groups, payloads)
        with torch.no_grad():
            loss_sum, num_tokens, parts = self._loss(tokens, emb)
        return [loss_stats(loss_sum, num_tokens, tokens["input_ids"].shape[0], parts)]
