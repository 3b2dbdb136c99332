"""Fused stage: the whole ``MimoModel`` in one process (the numerical reference and the ``fused`` runtime), with
the same optimizer, normalisation and clipping code as the disaggregated stages (it is a :class:`Stage`).

    stage = FusedStage(cfg); stage.setup()
    stats = [stage.forward_backward(mb) for mb in microbatches]
    stage.optimizer_step(lr, cfg.train.grad_clip, stage.reduce_grads(*stats))
"""

from __future__ import annotations

from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.model import build_fused_model
from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.payload import loss_stats, unpack


class FusedStage(Stage):
    """Encoders, projections and LM in this process (world of 1, no TP).

    Args:
        cfg: the config.
        spec: the run's ``MimoModelConfig`` (``None``: built from ``cfg``).
    """

    def __init__(self, cfg: Config, spec: Any = None):
        super().__init__(cfg, role="fused", rank=0, world_size=1, spec=spec)

    def build_module(self) -> torch.nn.Module:
        return build_fused_model(self.cfg, self.spec)

    def _loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        batch = unpack(batch, self.device)
        out = self.module(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            loss_mask=batch["loss_mask"],
            labels=batch["labels"],
            modality_inputs=batch.get("modality_inputs"),
            output_targets=batch.get("output_targets") or None,
        )
        loss_BS, mask_BS = out[0], out[1].to(out[0].dtype)
        loss_sum = (loss_BS * mask_BS).sum()
        parts = out[2] if len(out) > 2 else {}
        for value in parts.values():
            loss_sum = loss_sum + value  # decoder losses share the text loss's global token normalisation
        return loss_sum, mask_BS.sum(), parts

    @stage_call
    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        """Forward and backward of one C1 micro-batch; gradients accumulate until the optimizer step.

        Returns:
            ``{"loss_sum", "num_tokens", "num_samples"}``.
        """
        self._begin_step()
        loss_sum, num_tokens, parts = self._loss(batch)
        self.backward_loss(loss_sum)
        return loss_stats(loss_sum, num_tokens, len(batch["input_ids"]), parts)

    @stage_call
    def forward_only(self, batch: dict[str, Any]) -> dict[str, float]:
        """Evaluation stats of one micro-batch, no gradients."""
        with torch.no_grad():
            loss_sum, num_tokens, parts = self._loss(batch)
        return loss_stats(loss_sum, num_tokens, len(batch["input_ids"]), parts)
