"""Reading a :class:`~mimo_ray.config.Config`: YAML presets (with ``base:`` chains), CLI-style overrides and the
flags of the jobs.

Presets live in ``mimo_ray/configs/<name>.yaml``; a preset may name another with ``base:`` and only state what
differs. Unknown keys are errors. Overrides are dotted (``--train.lr=1e-4`` / ``train.lr=1e-4``) or use the
Megatron-style aliases in :data:`FLAG_ALIASES` (``--num-layers 4``).

    cfg = load_config("tiny", ["model.lm.num_layers=4", "--num-frames", "8"])
    save_config(cfg, "run/config.yaml"); assert load_config("run/config.yaml") == cfg
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from mimo_ray.config import Config

PRESET_DIR = Path(__file__).parent / "configs"


# Megatron-style flags → dotted config paths (the seed's names, DESIGN.md C9). Closed list, checked by a test.
FLAG_ALIASES: dict[str, str] = {
    "--num-layers": "model.lm.num_layers",
    "--hidden-size": "model.lm.hidden_size",
    "--num-attention-heads": "model.lm.num_attention_heads",
    "--ffn-hidden-size": "model.lm.ffn_hidden_size",
    "--seq-length": "model.lm.seq_length",
    "--vocab-size": "model.lm.vocab_size",
    "--vision-backbone-type": "model.vision.backbone_type",
    "--audio-backbone-type": "model.audio.backbone_type",
    "--num-frames": "model.vision.num_frames",
    "--audio-seq-len": "model.audio.audio_seq_len",
    "--attention-backend": "model.attention_backend",
    "--data-path": "data.data_path",
    "--val-path": "data.val_path",
    "--micro-batch-size": "data.micro_batch_size",
    "--global-batch-size": "data.global_batch_size",
    "--tensor-model-parallel-size": "parallel.lm_tp",
    "--runtime": "train.runtime",
    "--max-steps": "train.max_steps",
    "--lr": "train.lr",
    "--seed": "train.seed",
    "--output-dir": "train.output_dir",
    "--max-failures": "train.max_failures",
    "--init-from": "train.init_from",
    "--init-from-modules": "train.init_from_modules",
    "--checkpoint": "infer.checkpoint",
    "--output": "infer.output",
}
BOOL_FLAGS: dict[str, str] = {"--resume": "train.resume", "--overwrite": "train.overwrite"}


def _field_type(cls: type, name: str) -> Any:
    hints = typing.get_type_hints(cls)
    if name not in hints:
        raise ValueError(f"unknown config key {name!r} in {cls._path or 'config'}; known: {_field_names(cls)}")
    return hints[name]


def _field_names(cls: type) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Convert a YAML/CLI value to the annotated field type, naming the field when it cannot."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner[0])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{path} must be a mapping, got {value!r}")
        return _build(tp, value, path)
    if isinstance(value, str) and tp in (list, dict) or origin in (list, dict):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        want = origin or tp
        if not isinstance(value, want):
            raise ValueError(f"{path}={value!r} must be a {want.__name__}")
        return want(value)
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return low in ("true", "1", "yes")
            if not isinstance(value, bool):
                raise ValueError
            return value
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{path}={value!r} is not a valid {tp.__name__}") from None
    return value


def _build(cls: type, data: dict[str, Any], path: str = "") -> Any:
    kwargs = {}
    for key, value in data.items():
        sub = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(sub, value, _field_type(cls, key))
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "special_token_ids":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESET_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
            raise ValueError(f"unknown preset {name_or_path!r}; known presets: {', '.join(known)}")
    if not path.exists():
        raise ValueError(f"config file {str(path)!r} does not exist")
    if str(path) in seen:
        raise ValueError(f"config {path}: 'base' chain loops through {seen}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at top level")
    base = data.pop("base", None)
    preset = data.get("preset", path.stem)
    if base:
        data = _deep_merge(_read_yaml(base, (*seen, str(path))), data)
    data["preset"] = preset
    return data


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Turn CLI-style overrides into (dotted path, raw value) pairs.

    Accepts ``a.b=v``, ``--a.b=v``, ``--a.b v`` and the aliases of :data:`FLAG_ALIASES` / :data:`BOOL_FLAGS`.

    Raises:
        ValueError: on an unknown flag or a flag missing its value, naming the flag.
    """
    pairs: list[tuple[str, Any]] = []
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        i += 1
        key, eq, val = tok.partition("=")
        if key in BOOL_FLAGS:
            pairs.append((BOOL_FLAGS[key], val if eq else "true"))
            continue
        if key in FLAG_ALIASES:
            dotted = FLAG_ALIASES[key]
        elif key.startswith("--") and "." in key or not key.startswith("-") and eq:
            dotted = key.lstrip("-")
        else:
            raise ValueError(f"unknown flag {key!r}; see --help for the accepted flags")
        if not eq:
            if i >= len(overrides):
                raise ValueError(f"flag {key!r} needs a value")
            val = overrides[i]
            i += 1
        pairs.append((dotted, val))
    return pairs


def load_config(preset_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Load a preset name or YAML file and apply overrides.

    Args:
        preset_or_path: ``tiny``, ``bench-s``, ``bench-l``, ``avlm-7b`` or a path to a YAML file.
        overrides: CLI-style overrides, see :func:`parse_overrides`.

    Returns:
        The validated :class:`Config`.

    Raises:
        ValueError: naming the preset, file, key or flag at fault and what is allowed.
    """
    tree = _read_yaml(preset_or_path)
    for dotted, value in parse_overrides(list(overrides or [])):
        _set_dotted(tree, dotted, value)
    return _build(Config, tree)


def read_config_tree(preset_or_path: str) -> dict[str, Any]:
    """The raw tree of a preset or YAML file (``base:`` chains merged), before overrides and validation."""
    return _read_yaml(preset_or_path)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw tree (sections created as needed; unknown keys fail in :func:`build_config`)."""
    _set_dotted(tree, dotted, value)


def build_config(tree: dict[str, Any]) -> Config:
    """Coerce and validate a raw tree into a :class:`Config` (errors name the key at fault)."""
    return _build(Config, tree)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML; :func:`load_config` reads it back equal."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict`."""
    return _build(Config, data)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """Document the config flags on a job's ``--help`` (parsing itself goes through :func:`parse_overrides`)."""
    group = parser.add_argument_group("config", "preset/YAML plus overrides; any field also as --section.field=V")
    group.add_argument("--preset", "--config", dest="preset", default="tiny", help="preset name or YAML path")
    for flag, dotted in FLAG_ALIASES.items():
        group.add_argument(flag, dest=f"_alias_{dotted}", default=None, metavar="V", help=f"sets {dotted}")
    for flag, dotted in BOOL_FLAGS.items():
        group.add_argument(flag, dest=f"_bool_{dotted}", action="store_true", help=f"sets {dotted}=true")
    group.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def parse_job_args(argv: list[str] | None, doc: str | None = None, extra: Any = None) -> tuple[Config, Any]:
    """Parse a job's command line into a :class:`Config` (plus job-specific args).

    Args:
        argv: command line without the program name (``None``: ``sys.argv[1:]``).
        doc: the job's docstring, shown by ``--help``.
        extra: optional callable adding job-specific arguments to the parser.

    Returns:
        ``(config, namespace)``; the namespace holds the job-specific arguments.

    Raises:
        SystemExit: on ``--help`` or a malformed command line (argparse's exit code 2, naming the flag).
    """
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    if extra is not None:
        extra(parser)
    ns, rest = parser.parse_known_args(argv)
    overrides: list[str] = []
    for key, value in vars(ns).items():
        if key.startswith("_alias_") and value is not None:
            overrides.append(f"{key[len('_alias_'):]}={value}")
        elif key.startswith("_bool_") and value:
            overrides.append(f"{key[len('_bool_'):]}=true")
    overrides.extend(rest)
    try:
        cfg = load_config(ns.preset, overrides)
    except ValueError as err:
        parser.error(str(err))
    return cfg, ns
