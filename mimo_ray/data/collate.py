"""Decoded samples (Arrow rows, in plan order) → C1 micro-batches.

The same :class:`MicroBatcher` runs in the driver (``next_step``) and in the Ray Data collate actor (per-rank
streams), so both runtimes see identical micro-batches: good samples are taken in plan order, ``micro_batch_size`` at
a time; bad ones go to the quarantine callback. Arrays travel as raw bytes (fixed shapes known from the config), which
keeps Ray Data away from tensor-extension types and string columns away from ``iter_torch_batches``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from mimo_ray.data.decode_hooks import concat_user_media, pack_user_media, unpack_user_media
from mimo_ray.data.quarantine import BadRow
from mimo_ray.data.sample_media import from_transport, transport_layout

MODALITY_COLUMNS = {"video": "m_video", "audio": "m_audio", "images": "m_images"}

#: One decoded sample (output of the decode op).
DECODED_SCHEMA = pa.schema(
    [
        ("pos", pa.int64()),  # global plan position (epoch * num_rows + offset)
        ("epoch", pa.int64()),
        ("row", pa.int64()),  # manifest row index
        ("id", pa.string()),
        ("ok", pa.bool_()),
        ("stage", pa.string()),
        ("error", pa.string()),
        ("path", pa.string()),
        ("tokens", pa.binary()),  # int32: padded input ids [S] (train/eval) or the unpadded prompt (infer)
        ("labels", pa.binary()),  # int32 [S] (train/eval)
        ("loss_mask", pa.binary()),  # uint8 [S] (train/eval)
        ("answer", pa.string()),  # reference answer (infer)
        ("meta", pa.string()),  # JSON metadata of the manifest row
        ("m_video", pa.binary()),
        ("m_audio", pa.binary()),
        ("m_images", pa.binary()),
        ("m_user", pa.binary()),  # .npz of user modalities' encoder inputs (decode_hooks.pack_user_media)
    ]
)

#: One collated micro-batch (output of the collate actor, one row per block).
MICROBATCH_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # global micro-batch index
        ("ids", pa.string()),  # JSON list
        ("size", pa.int64()),
        ("input_ids", pa.binary()),
        ("labels", pa.binary()),
        ("loss_mask", pa.binary()),
        ("m_video", pa.binary()),
        ("m_audio", pa.binary()),
        ("m_images", pa.binary()),
        ("m_user", pa.binary()),  # .npz of user modalities' encoder inputs (decode_hooks.pack_user_media)
    ]
)


@dataclass(frozen=True)
class BatchLayout:
    """Shapes and names needed to rebuild tensors from bytes (computed from the config in the driver).

    Attributes:
        seq_length: S.
        shapes: per-sample encoder input shape of each modality.
        encoders: ``{modality: (encoder_name, kwarg)}`` of ``modality_inputs``.
    """

    seq_length: int
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    encoders: tuple[tuple[str, tuple[str, str]], ...]

    @classmethod
    def from_config(cls, cfg: Any) -> BatchLayout:
        from mimo_ray.config import MODALITIES
        from mimo_ray.model.spec import INPUT_KWARG, encoder_name, input_shape

        mods = [m for m in cfg.model.modalities if m in MODALITIES]  # user modalities travel in m_user
        return cls(
            seq_length=cfg.model.lm.seq_length,
            shapes=tuple((m, tuple(input_shape(cfg, m))) for m in mods),
            encoders=tuple((m, (encoder_name(cfg.model, m), INPUT_KWARG[m])) for m in mods),
        )

    @property
    def modalities(self) -> list[str]:
        return [m for m, _ in self.shapes]

    def shape(self, modality: str) -> tuple[int, ...]:
        return dict(self.shapes)[modality]

    def media_from_bytes(self, modality: str, data: bytes, size: int | None = None) -> np.ndarray:
        """Items' transport bytes → transport array ``[N_items, ...]`` (read-only view); samples carry any number
        of items (0, 1, several), so the count comes from the bytes. ``size`` (samples) is only a check when every
        sample has one item.
        """
        dtype, shape = transport_layout(modality, self.shape(modality))
        per = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if len(data) % per:
            raise ValueError(f"{modality}: {len(data)} bytes are not whole items of {shape} {np.dtype(dtype)}")
        return np.frombuffer(data, dtype=dtype).reshape(len(data) // per, *shape)


@dataclass
class MicroBatch:
    """One micro-batch in numpy: ``input_ids/labels`` int64 ``[B, S]``, ``loss_mask`` float32 ``[B, S]``,
    ``media[modality]`` in its transport layout, every item of the batch in sample order (uint8 RGB frames
    ``[N, T, H, W, 3]`` / ``[N, H, W, 3]``, float32 audio ``[N, bins, frames]``; a modality without items is
    absent), ``user`` the user modalities' ``{modality: {encoder: {kwarg: [N, ...]}}}``; ``ids`` the sample ids.
    """

    index: int
    ids: list[str]
    input_ids: np.ndarray
    labels: np.ndarray
    loss_mask: np.ndarray
    media: dict[str, np.ndarray]
    user: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_batch(self, layout: BatchLayout) -> dict[str, Any]:
        """The C1 batch (torch tensors) the model consumes, plus ``ids``."""
        import torch

        size, seq = self.input_ids.shape
        encoders = dict(layout.encoders)
        modality_inputs = {
            mod: {encoders[mod][0]: {encoders[mod][1]: torch.from_numpy(from_transport(mod, arr))}}
            for mod, arr in self.media.items()
            if len(arr)
        }
        for mod, encoders_in in self.user.items():
            modality_inputs[mod] = {e: {k: torch.from_numpy(np.array(a)) for k, a in kw.items()}
                                    for e, kw in encoders_in.items()}
        return {
            "input_ids": torch.from_numpy(self.input_ids.astype(np.int64)),
            "position_ids": torch.arange(seq, dtype=torch.long).unsqueeze(0).expand(size, seq).contiguous(),
            "labels": torch.from_numpy(self.labels.astype(np.int64)),
            "loss_mask": torch.from_numpy(self.loss_mask.astype(np.float32)),
            "modality_inputs": modality_inputs,
            "ids": list(self.ids),
        }

    def to_row(self) -> dict[str, Any]:
        """A :data:`MICROBATCH_SCHEMA` row."""
        row = {
            "index": self.index,
            "ids": json.dumps(self.ids),
            "size": len(self.ids),
            "input_ids": self.input_ids.astype(np.int32).tobytes(),
            "labels": self.labels.astype(np.int32).tobytes(),
            "loss_mask": self.loss_mask.astype(np.uint8).tobytes(),
        }
        for mod, col in MODALITY_COLUMNS.items():
            row[col] = self.media[mod].tobytes() if mod in self.media else b""
        row["m_user"] = pack_user_media(self.user)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any], layout: BatchLayout) -> MicroBatch:
        size, seq = int(row["size"]), layout.seq_length

        def tokens(name: str, dtype: type) -> np.ndarray:
            return np.frombuffer(row[name], dtype=dtype).reshape(size, seq)

        media = {mod: layout.media_from_bytes(mod, row[MODALITY_COLUMNS[mod]]) for mod in layout.modalities}
        media = {mod: arr for mod, arr in media.items() if len(arr)}
        return cls(
            index=int(row["index"]),
            ids=json.loads(row["ids"]),
            input_ids=tokens("input_ids", np.int32).astype(np.int64),
            labels=tokens("labels", np.int32).astype(np.int64),
            loss_mask=tokens("loss_mask", np.uint8).astype(np.float32),
            media=media,
            user=unpack_user_media(row.get("m_user") or b""),
        )


def bad_row_of(row: dict[str, Any], manifest: str, split: str) -> BadRow:
    """The quarantine record of a decoded row with ``ok=False``."""
    return BadRow(
        id=row["id"], path=row["path"] or "", stage=row["stage"], error=row["error"] or "",
        manifest=manifest, row=int(row["row"]), split=split,
    )  # fmt: skip


class MicroBatcher:
    """Groups good decoded samples, in order, into micro-batches of ``micro_batch_size``.

    Args:
        layout: shapes.
        micro_batch_size: B.
        start_index: global index of the first micro-batch it emits.
        on_bad: called with ``(epoch, BadRow)`` for every bad row, in order (quarantine + bad-data gate).
        manifest, split: for the quarantine records.
        known_bad: ``(id, epoch) → stage`` of rows already known bad (``None``: not known). Such a row is bad even
            if a decode task decoded it before the fact reached it, so what is consumed never depends on timing.
    """

    def __init__(
        self,
        layout: BatchLayout,
        micro_batch_size: int,
        start_index: int,
        on_bad: Callable[[int, BadRow], None],
        manifest: str = "",
        split: str = "",
        known_bad: Callable[[str, int], str | None] | None = None,
    ) -> None:
        self.layout = layout
        self.micro_batch_size = micro_batch_size
        self.next_index = start_index
        self.on_bad = on_bad
        self.manifest = manifest
        self.split = split
        self.known_bad = known_bad
        self._pending: list[dict[str, Any]] = []
        self.rows_in = 0
        self.rows_out = 0
        self.rows_bad = 0
        self.last_pos = -1

    def add(self, table: pa.Table) -> list[MicroBatch]:
        """Feed decoded rows (in plan order); returns the micro-batches completed by them."""
        out = []
        for row in table.to_pylist():
            self.rows_in += 1
            if row["pos"] <= self.last_pos:
                raise RuntimeError(f"decoded rows arrived out of plan order ({row['pos']} after {self.last_pos})")
            self.last_pos = row["pos"]
            if row["ok"] and self.known_bad is not None:
                stage = self.known_bad(row["id"], int(row["epoch"]))
                if stage is not None:
                    row = {**row, "ok": False, "stage": stage, "error": f"known bad ({stage}); not used again"}
            if not row["ok"]:
                self.rows_bad += 1
                self.on_bad(int(row["epoch"]), bad_row_of(row, self.manifest, self.split))
                continue
            self._pending.append(row)
            if len(self._pending) == self.micro_batch_size:
                out.append(self._collate(self._pending))
                self._pending = []
        return out

    def flush(self) -> list[MicroBatch]:
        """The trailing partial micro-batch (finite splits), if any."""
        if not self._pending:
            return []
        batch = self._collate(self._pending)
        self._pending = []
        return [batch]

    def _collate(self, rows: list[dict[str, Any]]) -> MicroBatch:
        size, seq = len(rows), self.layout.seq_length

        def stack(name: str, dtype: type) -> np.ndarray:
            return np.frombuffer(b"".join(r[name] for r in rows), dtype=dtype).reshape(size, seq)

        media = {
            mod: self.layout.media_from_bytes(mod, b"".join(r[MODALITY_COLUMNS[mod]] for r in rows))
            for mod in self.layout.modalities
        }
        media = {mod: arr for mod, arr in media.items() if len(arr)}  # a modality no sample of the batch carries
        batch = MicroBatch(
            index=self.next_index,
            ids=[r["id"] for r in rows],
            input_ids=stack("tokens", np.int32).astype(np.int64),
            labels=stack("labels", np.int32).astype(np.int64),
            loss_mask=stack("loss_mask", np.uint8).astype(np.float32),
            media=media,
            user=concat_user_media([unpack_user_media(r.get("m_user") or b"") for r in rows]),
        )
        self.next_index += 1
        self.rows_out += size
        return batch
