"""``mimo_ray.load_config``: a preset or YAML file plus overrides, as a list of ``"section.field=value"`` or a dict."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from mimo_ray.config import Config
from mimo_ray.config_cli import build_config, parse_overrides, read_config_tree, set_dotted

#: Dict-valued fields: a nested mapping under one of these is the field's value, not more sections.
_DICT_FIELDS = ("special_token_ids", "modality_tokens", "modality_tags", "pretrained", "encoder_resources",
                "lm_resources", "decoder_resources")


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and str(key) not in _DICT_FIELDS:
            out.extend(_flatten(value, dotted))
        else:
            out.append((dotted, value))
    return out


def load_config(
    preset_or_yaml: str | os.PathLike = "tiny", overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> Config:
    """The validated config of a preset (``tiny``, ``bench-s``, ``bench-l``, ``avlm-7b``, ``llava-avlm-7b``) or a
    YAML file, with overrides.

    Args:
        preset_or_yaml: a preset name or a path to a YAML file (a run's ``config.yaml`` works too).
        overrides: ``["train.runtime=fused", "model.modalities=[]"]`` (the job flags' grammar without the dashes;
            Megatron-style aliases such as ``--num-layers`` work as well), or a dict, flat
            (``{"train.lr": 1e-4}``) or nested (``{"train": {"lr": 1e-4}}``) with Python values.

    Returns:
        The :class:`~mimo_ray.config.Config` tree.

    Raises:
        ValueError: an unknown preset, file, key or flag, or a value that is not allowed, naming it.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'section.field=value' strings or a dict, not one string")
    tree = read_config_tree(str(preset_or_yaml))
    pairs = _flatten(overrides) if isinstance(overrides, Mapping) else parse_overrides(list(overrides or []))
    for dotted, value in pairs:
        set_dotted(tree, dotted, value)
    return build_config(tree)
