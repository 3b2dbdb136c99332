"""A local Hugging Face model directory: its ``config.json`` and a lazy, tensor-by-tensor view of its weights.

Weights come from ``model.safetensors``, a sharded ``model.safetensors.index.json``, or ``pytorch_model.bin`` /
``pytorch_model.bin.index.json`` (loaded with ``weights_only=True``). Safetensors files are memory-mapped and read
one tensor at a time, so importing a 7B model never holds the source in memory.

    src = HFDir("ckpts/vicuna-7b")
    src.config["hidden_size"]; "model.norm.weight" in src; w = src.get("model.norm.weight")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class HFDir:
    """Read-only access to one local Hugging Face model directory.

    Args:
        path: the directory (holding ``config.json`` and weights).
        flag: the command-line flag that named it (for errors).

    Raises:
        ValueError: the directory, its ``config.json`` or its weights are missing or unreadable.
    """

    def __init__(self, path: str | Path, flag: str = "--dir") -> None:
        self.path = Path(path)
        self.flag = flag
        if not self.path.is_dir():
            raise ValueError(f"{flag} {str(self.path)!r} is not a directory")
        cfg_file = self.path / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{flag} {str(self.path)!r} has no config.json")
        try:
            self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg_file}: not valid JSON ({err})") from None
        self._where: dict[str, Path] = {}
        self._bin_cache: tuple[Path, dict[str, torch.Tensor]] | None = None
        self._handles: dict[Path, Any] = {}
        self._index_weights()

    def _index_weights(self) -> None:
        for index_name in (SAFE_INDEX, BIN_INDEX):
            index = self.path / index_name
            if index.is_file():
                weight_map = json.loads(index.read_text()).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: no 'weight_map' mapping")
                for key, file in weight_map.items():
                    shard = self.path / file
                    if not shard.is_file():
                        raise ValueError(f"{index}: key {key!r} names shard {file!r}, which does not exist")
                    self._where[key] = shard
                return
        single = self.path / SAFE_SINGLE
        if single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self._where = dict.fromkeys(f.keys(), single)
            return
        single = self.path / BIN_SINGLE
        if single.is_file():
            self._where = dict.fromkeys(self._load_bin(single), single)
            return
        raise ValueError(
            f"{self.flag} {str(self.path)!r} has no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX})"
        )

    def _load_bin(self, file: Path) -> dict[str, torch.Tensor]:
        if self._bin_cache is None or self._bin_cache[0] != file:
            self._bin_cache = None  # drop the previous shard before reading the next one
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:
                raise ValueError(f"{file}: cannot be read with torch.load(weights_only=True): {err}") from None
            self._bin_cache = (file, state)
        return self._bin_cache[1]

    def keys(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard.

        Raises:
            KeyError: naming the key and the directory.
        """
        file = self._where.get(key)
        if file is None:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        if file.suffix == ".safetensors":
            handle = self._handles.get(file)
            if handle is None:
                from safetensors import safe_open

                if self._handles:  # unmap the shard we moved past: its pages leave this process
                    self._handles.pop(next(iter(self._handles)))
                handle = self._handles[file] = safe_open(file, framework="pt")
            return handle.get_tensor(key)
        return self._load_bin(file)[key]

    def close(self) -> None:
        """Release memory maps and cached ``.bin`` shards."""
        self._handles.clear()
        self._bin_cache = None
