"""Output-decoder stage (``parallel.decoder_placement=group``): the image/audio decoders as their own group.

Per LM micro-batch the LM ranks send the final-norm hidden states at the generation tokens and the targets; this
stage decodes them, computes the weighted L1/MSE losses (the fused model's ``OutputDecoders.loss_sums``),
backpropagates into its own parameters and returns ``d loss / d rows`` for the LM's backward.

    stage = DecoderStage(cfg); stage.setup()
    parts, grad_rows = stage.decode_backward(0, {"rows": {"image_out": r_NH}, "targets": {"image_out": t}})
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.model import build_decoder_part
from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.payload import pack, unpack


class DecoderStage(Stage):
    """``OutputDecoders`` on one actor of the decoder group (world of 1; its parameters are the fused model's
    ``output_decoders.*``).

    Args:
        cfg: the whole config (``model.outputs`` enables at least one output).
        rank, world_size: this actor in the group (1 actor).
        role: group name.
    """

    def __init__(self, cfg: Config, *, rank: int = 0, world_size: int = 1, role: str = "decoders"):
        super().__init__(cfg, role=role, rank=rank, world_size=world_size, name_prefix="output_decoders.")

    def build_module(self) -> torch.nn.Module:
        return build_decoder_part(self.cfg)

    def _losses(self, payload: Any, train: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        data = unpack(payload, self.device)
        rows = {name: r.requires_grad_(train) for name, r in data["rows"].items()}
        with torch.set_grad_enabled(train):
            parts = self.module.loss_sums(rows, data["targets"]) if rows else {}
        return rows, parts

    @stage_call
    def decode_backward(self, key: Any, payload: Any) -> list[Any]:
        """Decoder losses of one LM micro-batch and their backward; decoder gradients accumulate until the step.

        Args:
            key: LM micro-batch id (for errors).
            payload: ``{"rows": {output: [N*K, H]}, "targets": {output: [N, ...]}}`` from ``forward_rows``.

        Returns:
            ``[{output: weighted loss sum}, {output: d loss / d rows [N*K, H]}]``.
        """
        self._begin_step()
        rows, parts = self._losses(payload, train=True)
        if parts:
            self.backward_loss(sum(parts.values()))
        grads = {n: r.grad if r.grad is not None else torch.zeros_like(r) for n, r in rows.items()}
        return [{n: float(v.detach()) for n, v in parts.items()}, pack(grads, self.payload_format)]

    @stage_call
    def decode_eval(self, key: Any, text_stats: dict[str, float], payload: Any) -> list[dict[str, float]]:
        """Evaluation: the LM micro-batch's stats with the decoder losses added (no gradients)."""
        _, parts = self._losses(payload, train=False)
        stats = dict(text_stats)
        values = {n: float(v) for n, v in parts.items()}
        stats["loss_sum"] = math.fsum([stats["loss_sum"], *values.values()])
        stats.update({f"{n}_loss_sum": v for n, v in values.items()})
        return [stats]
