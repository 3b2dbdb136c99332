"""Writing Hugging Face weight files like ``save_pretrained``: one dtype, sharded safetensors past a size, an index.

save_weights(tensors, out_dir, dtype="bf16", max_shard_size="5GB")
→ out_dir/model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``torch_dtype`` names in ``config.json``.
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """``"5GB"`` (10**9 units, as ``transformers``), ``"500MiB"`` (2**20) or a byte count → bytes.

    Raises:
        ValueError: an unreadable size, naming it.
    """
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(size).upper())
        if not match or match.group(2) not in _UNITS:
            raise ValueError(f"--max-shard-size {size!r}: expected a size like 5GB, 500MB, 64KiB or a byte count")
        value = int(float(match.group(1)) * _UNITS[match.group(2)])
    if value <= 0:
        raise ValueError(f"--max-shard-size {size!r} must be positive")
    return value


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of ``--dtype`` (``fp32``, ``bf16``, ``fp16``).

    Raises:
        ValueError: another name.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def shard_plan(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Keys per shard, in order: a shard closes when the next tensor would take it past ``max_bytes`` (a tensor
    larger than ``max_bytes`` gets a shard of its own), like ``transformers``' ``save_pretrained``.
    """
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def save_weights(tensors: dict[str, torch.Tensor], out: Path, dtype: str = "fp32",
                 max_shard_size: str | int = "5GB", name: str = WEIGHTS) -> list[Path]:  # fmt: skip
    """Cast floating tensors to ``dtype`` and write them as one file or shards with an index.

    Args:
        tensors: ``{HF key: tensor}``.
        out: the directory (created).
        dtype: ``fp32``, ``bf16`` or ``fp16``; integer tensors keep their dtype.
        max_shard_size: largest shard (see :func:`parse_size`).
        name: the single file's name; shards are ``<stem>-0000k-of-0000n.safetensors`` with ``<name>.index.json``.

    Returns:
        The files written (the index last).
    """
    from safetensors.torch import save_file

    want = check_dtype(dtype)
    limit = parse_size(max_shard_size)
    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(want) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    plan = shard_plan(cast, limit)
    stem = name.removesuffix(".safetensors")
    for old in [out / name, out / f"{name}.index.json", *out.glob(f"{stem}-*-of-*.safetensors")]:
        old.unlink(missing_ok=True)  # a previous export's files would shadow or mix with these
    if len(plan) == 1:
        save_file(cast, str(out / name), metadata={"format": "pt"})
        return [out / name]
    written, weight_map = [], {}
    for i, keys in enumerate(plan, start=1):
        file = f"{stem}-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({k: cast[k] for k in keys}, str(out / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
        written.append(out / file)
    total = sum(v.numel() * v.element_size() for v in cast.values())
    index = out / f"{name}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*written, index]


def set_config_dtype(out: Path, dtype: str) -> None:
    """Record the weights' dtype in ``out/config.json`` (``torch_dtype``), when that file exists."""
    path = out / "config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        config.pop("dtype", None)
        config["torch_dtype"] = DTYPE_NAMES[dtype]
        path.write_text(json.dumps(config, indent=2))
