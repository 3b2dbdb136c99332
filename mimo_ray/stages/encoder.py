"""Encoder stage: one data-parallel rank of an encoder group (one modality or several), plain Python.

Per micro-batch: ``forward_step`` runs encoders + projections and returns the embedding rows of each piece of the
batch (the samples one LM micro-batch owns), ``backward_step`` later receives the gradients of those rows and runs
backward. The group that reads data (the *leader*) also forwards the token tensors to the LM and the media of other
modalities to the other encoder groups.

    stage = EncoderStage(cfg, ["video", "audio"], rank=0, world_size=1); stage.setup()
    pieces = stage.forward_step(0, batch, ranges=[(0, 4)])      # [{"emb": {...}, "tokens": {...}}]
    stage.backward_step(0, {"video": g_NH, "audio": g_NH})
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mimo_ray.config import Config
from mimo_ray.data.random_stream import RandomBatchStream
from mimo_ray.model import build_encoder_part, encode_modalities
from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.payload import (
    TOKEN_KEYS,
    batch_size,
    concat_rows,
    pack,
    slice_output_targets,
    slice_samples,
    unpack,
)


class EncoderStage(Stage):
    """Encoders + projections of ``modalities`` on one rank.

    Args:
        cfg: the whole config.
        modalities: modalities this group encodes (a subset of ``cfg.model.modalities``).
        rank: data-parallel rank in the group.
        world_size: ``cfg.parallel.encoder_dp``.
        role: group name, e.g. ``encoder-shared`` or ``encoder-video``.
        leader: this group reads the data (and hands tokens to the LM and media to the other groups).
        spec: the run's ``MimoModelConfig`` (``None``: built from ``cfg``); this stage builds its modalities' entries.
    """

    def __init__(
        self,
        cfg: Config,
        modalities: list[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        role: str = "encoder-shared",
        leader: bool = True,
        spec: Any = None,
    ):
        super().__init__(
            cfg, role=role, rank=rank, world_size=world_size, name_prefix="modality_submodules.", spec=spec
        )
        unknown = [m for m in modalities if m not in cfg.model.modalities]
        if unknown:
            raise ValueError(f"modalities {unknown} are not in model.modalities={cfg.model.modalities}")
        self.modalities = list(modalities)
        self.leader = leader
        self._graphs: dict[Any, dict[str, torch.Tensor]] = {}
        self._data: Iterator | None = None
        self._consumed: list[str] = []  # sample ids pulled from the data stream in the current training step

    def build_module(self) -> torch.nn.Module:
        return build_encoder_part(self.cfg, self.modalities, self.spec)

    @stage_call
    def set_data_iterator(self, iterable: Iterable | None) -> None:
        """Read micro-batches from ``iterable`` (``None``: correctly shaped random batches for this rank)."""
        if iterable is None:
            iterable = RandomBatchStream(self.cfg, rank=self.rank, num_ranks=self.world_size)
        elif callable(iterable) and not hasattr(iterable, "__iter__"):
            iterable = iterable()
        self._data = iter(iterable)

    def _next_batch(self) -> dict[str, Any]:
        if self._data is None:
            self.set_data_iterator(None)
        try:
            batch = next(self._data)
        except StopIteration:
            raise RuntimeError("the data iterator is exhausted") from None
        want = self.cfg.data.micro_batch_size
        if batch_size(batch) != want:
            raise ValueError(f"a micro-batch from the data iterator has {batch_size(batch)} samples; expected {want}")
        return batch

    @stage_call
    def forward_step(
        self,
        key: Any,
        batch: dict[str, Any] | None,
        ranges: list[tuple[int, int]],
        followers: list[list[str]] = (),
        train: bool = True,
    ) -> list[Any]:
        """Encode one micro-batch and cut the embeddings into pieces for the LM ranks.

        Args:
            key: micro-batch id; :meth:`backward_step` uses it to find the graph.
            batch: a C1 micro-batch, or ``None`` to pull from this rank's data iterator (leader); followers get
                ``{"input_ids" [B, S], "modality_inputs"}`` from the leader.
            ranges: ``[(start, stop), …]`` sample ranges covering ``0..B`` in order, one per destination piece.
            followers: modalities of each other encoder group (leader only): their media go out after the pieces.
            train: keep the graph for backward.

        Returns:
            One payload per range: ``{"emb": {modality: [N_piece, H]}}`` plus ``"tokens": {key: [b, S]}`` (and
            ``"targets": {output: [n, ...]}`` when the batch has ``output_targets``) on the leader; then (leader)
            one media payload per follower group.

        Raises:
            ValueError: the ranges do not tile the batch, or rows and placeholders disagree.
        """
        if train:
            self._begin_step()
        if batch is None:
            batch = self._next_batch()
            if train:
                self._consumed.extend(batch.get("ids") or [])
        batch = unpack(batch, self.device)
        input_ids = batch["input_ids"]
        size = batch_size(batch)
        starts = [r[0] for r in ranges]
        stops = [r[1] for r in ranges]
        if not ranges or starts[0] != 0 or stops[-1] != size or starts[1:] != stops[:-1]:
            raise ValueError(f"piece ranges {ranges} do not tile a micro-batch of {size} samples")
        inputs = batch.get("modality_inputs") or {}
        with torch.set_grad_enabled(train):
            emb = encode_modalities(self.module, inputs, known=self.cfg.model.modalities)
        if train:
            self._graphs[key] = emb
        ids = self.cfg.model.special_token_ids
        outputs = []
        for start, stop in ranges:
            piece: dict[str, Any] = {"emb": slice_samples(emb, input_ids, ids, start, stop)}
            if self.leader:
                piece["tokens"] = {k: batch[k][start:stop] for k in TOKEN_KEYS}
                if batch.get("output_targets"):
                    specs = self.cfg.model.outputs.active()
                    targets = batch["output_targets"]
                    piece["targets"] = slice_output_targets(targets, input_ids, specs, start, stop)
            outputs.append(pack(piece, self.payload_format))
        for mods in followers:
            media = {m: inputs[m] for m in mods if inputs.get(m) is not None}
            outputs.append(pack({"input_ids": input_ids, "modality_inputs": media}, "numpy"))
        return outputs

    @stage_call
    def reset_step(self) -> None:
        """Abandon a failed step (see :meth:`Stage.reset_step`); the ids it pulled are not reported as consumed."""
        super().reset_step()
        self._consumed = []

    @stage_call
    def optimizer_step(self, lr: float, max_norm: float, *sq_norms: float) -> dict[str, Any]:
        """:meth:`Stage.optimizer_step`, plus ``"sample_ids"``: the ids this rank pulled from its stream this step."""
        out = super().optimizer_step(lr, max_norm, *sq_norms)
        out["sample_ids"], self._consumed = self._consumed, []
        return out

    @stage_call
    def backward_step(self, key: Any, *grad_pieces: dict[str, Any]) -> None:
        """Backward of a micro-batch from the gradients of its embedding rows.

        Args:
            key: the micro-batch id given to :meth:`forward_step`.
            *grad_pieces: ``{modality: [N_piece, H]}`` per piece, in the order of the forward's ranges.

        Raises:
            KeyError: no forward graph is stored under ``key``.
        """
        if key not in self._graphs:
            raise KeyError(f"no forward graph for micro-batch {key!r}")
        emb = self._graphs.pop(key)
        grads = concat_rows([unpack(g, self.device) for g in grad_pieces])
        names = [n for n in emb if emb[n].requires_grad]  # frozen modalities' rows carry no graph
        if not names:
            return
        missing = [n for n in names if n not in grads]
        if missing:
            raise ValueError(f"no gradient came back for modalities {missing}")
        for name in names:
            if grads[name].shape != emb[name].shape:
                raise ValueError(
                    f"modality {name!r}: gradient {tuple(grads[name].shape)} for embeddings {tuple(emb[name].shape)}"
                )
        torch.autograd.backward([emb[n] for n in names], [grads[n] for n in names])
