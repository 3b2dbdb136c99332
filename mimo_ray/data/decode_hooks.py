"""Decode functions for user modalities (issue 20 item 5): ``row -> {encoder: {kwarg: array [k, ...]}}``.

A manifest row carries a user modality in any field the function reads (``{"id": "a", "depth": "a.npy", ...}``);
the row's ``<depth>`` tags say how many items it holds, one per tag, and the function returns the encoder inputs of
those ``k`` items stacked on dim 0. It runs in the Ray Data decode workers, next to the media decode of our
modalities, under the same quarantine: an exception (or a wrong item count) puts the row in ``quarantine.jsonl``
with stage ``decode`` and an error naming the modality and the function's message; the job goes on.

    trainer = mimo_ray.Trainer(cfg, mimo_config=spec, data="train.jsonl", decoders={"depth": read_depth})

Decoders are also config: ``data.decoders: {depth: "package.module:function"}`` (what ``jobs/train.py`` uses, and
what a resumed run rebuilds from). Functions given in Python are shipped to the decode workers pickled by value, so a
function of the driver script works.
"""

from __future__ import annotations

import importlib
import io
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

Decoder = Callable[[dict[str, Any]], Mapping[str, Mapping[str, Any]]]
_SEP = "\x1f"


def load_decoder(modality: str, path: str) -> Decoder:
    """The function ``package.module:function`` names (``data.decoders.<modality>``).

    Raises:
        ValueError: it cannot be imported or is not callable, naming the config key.
    """
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr, None)
    except ImportError as err:
        raise ValueError(f"data.decoders.{modality}={path!r}: cannot import {module_name!r} ({err})") from err
    if not callable(fn):
        raise ValueError(f"data.decoders.{modality}={path!r}: {module_name!r} has no callable {attr!r}")
    return fn


def resolve_decoders(paths: Mapping[str, str], given: Mapping[str, Decoder] | None) -> dict[str, Decoder]:
    """``data.decoders`` import paths, overridden by functions given in Python."""
    out = {mod: load_decoder(mod, path) for mod, path in paths.items()}
    out.update(dict(given or {}))
    return out


def run_decoder(modality: str, fn: Decoder, row: dict[str, Any], items: int) -> dict[str, dict[str, np.ndarray]]:
    """Call a user decode function and check what it returned.

    Args:
        modality: the modality (named in errors).
        fn: the function.
        row: the manifest row as the user wrote it (its own fields, ``id``, ``conversations``).
        items: the row's tag count of the modality: the leading dim every returned array must have.

    Returns:
        ``{encoder: {kwarg: array [items, ...]}}`` (numpy, contiguous).

    Raises:
        ValueError: the function raised, or returned something else (naming the modality and the function).
    """
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        out = fn(row)
    except Exception as err:  # noqa: BLE001 - any failure of user code quarantines the row with its message
        raise ValueError(f"modality {modality!r}: decode function {name} raised {type(err).__name__}: {err}") from err
    if not isinstance(out, Mapping) or not out:
        raise ValueError(f"modality {modality!r}: decode function {name} returned {type(out).__name__}, not "
                         "{encoder: {kwarg: array}}")
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for enc, kwargs in out.items():
        if not isinstance(kwargs, Mapping):
            raise ValueError(f"modality {modality!r}: decode function {name} gave encoder {enc!r} a "
                             f"{type(kwargs).__name__}, not {{kwarg: array}}")
        arrays[str(enc)] = {}
        for kwarg, value in kwargs.items():
            arr = np.ascontiguousarray(np.asarray(value))
            if arr.ndim == 0 or arr.shape[0] != items:
                raise ValueError(f"modality {modality!r}: {enc}.{kwarg} has shape {arr.shape} for {items} item(s) "
                                 f"(one per tag; decode function {name})")
            arrays[str(enc)][str(kwarg)] = arr
    return arrays


def pack_user_media(media: Mapping[str, Mapping[str, Mapping[str, np.ndarray]]]) -> bytes:
    """``{modality: {encoder: {kwarg: array}}}`` → ``.npz`` bytes (no pickle) for an Arrow binary column."""
    if not media:
        return b""
    flat = {_SEP.join((m, e, k)): a for m, encs in media.items() for e, kws in encs.items() for k, a in kws.items()}
    buf = io.BytesIO()
    np.savez(buf, **flat)
    return buf.getvalue()


def unpack_user_media(data: bytes) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Inverse of :func:`pack_user_media`."""
    if not data:
        return {}
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        for key in npz.files:
            mod, enc, kwarg = key.split(_SEP)
            out.setdefault(mod, {}).setdefault(enc, {})[kwarg] = npz[key]
    return out


def concat_user_media(parts: list[dict[str, dict[str, dict[str, np.ndarray]]]]) -> dict[str, dict[str, Any]]:
    """Samples' user media, in sample order → one micro-batch's ``{modality: {encoder: {kwarg: [N_items, ...]}}}``.

    Raises:
        ValueError: samples of one batch give one modality different encoders / kwargs or item shapes.
    """
    mods = sorted({m for p in parts for m in p})
    out: dict[str, dict[str, Any]] = {}
    for mod in mods:
        have = [p[mod] for p in parts if mod in p]
        keys = {(e, k) for e, kws in have[0].items() for k in kws}
        for h in have[1:]:
            if {(e, k) for e, kws in h.items() for k in kws} != keys:
                raise ValueError(f"modality {mod!r}: samples of one micro-batch give different encoder inputs")
        out[mod] = {}
        for enc, kwarg in sorted(keys):
            try:
                out[mod].setdefault(enc, {})[kwarg] = np.concatenate([h[enc][kwarg] for h in have])
            except ValueError as err:
                raise ValueError(f"modality {mod!r}: {enc}.{kwarg} item shapes differ within a micro-batch ({err})"
                                 ) from None
    return out


_REGISTERED: dict[str, Decoder] = {}


def register(decoders: Mapping[str, Decoder] | None) -> None:
    """Decode functions given in Python (``Trainer(decoders=...)``) for the pipelines this process starts next
    (they travel to the decode workers inside the decode options); ``None`` or ``{}`` clears them.
    """
    _REGISTERED.clear()
    _REGISTERED.update(dict(decoders or {}))


def registered() -> dict[str, Decoder]:
    """The functions :func:`register` holds."""
    return dict(_REGISTERED)
