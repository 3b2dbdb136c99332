"""Where a run's Megatron ``MimoModelConfig`` comes from, and the config that agrees with it (DESIGN.md C13).

The ``MimoModelConfig`` is the one description of the model every runtime builds from. It is either ours (built from
the config tree by :func:`~mimo_ray.model.spec.mimo_config`), returned by the user's spec factory
(``model.spec_factory = "package.module:function"``, recorded with every checkpoint so resume, recovery and
inference rebuild it), or an object the user hands the trainer (their own ``ModuleSpec``s, classes defined in their
driver script included: Ray pickles those by value).

    spec = build_mimo_config(cfg)                         # exactly what the runtimes build from cfg
    spec.modality_submodules_spec["depth"] = ModuleSpec(...); spec.special_token_ids["depth"] = 270
    cfg = config_for_spec(cfg, spec)                      # model.modalities / special_token_ids follow the spec
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from megatron.core.models.mimo import MimoModelConfig

from mimo_ray.config import Config
from mimo_ray.model.spec import mimo_config


def load_spec_factory(path: str) -> Any:
    """The function ``package.module:function`` names.

    Raises:
        ValueError: the module cannot be imported or has no such callable (naming ``model.spec_factory``).
    """
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.spec_factory={path!r}: cannot import {module_name!r} ({err})") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model.spec_factory={path!r}: {module_name!r} has no callable {attr!r}")
    return factory


_IN_FACTORY: list[str] = []  # the factory being called (its own build_mimo_config(cfg) gets our base spec)


def build_mimo_config(cfg: Config) -> MimoModelConfig:
    """The ``MimoModelConfig`` the runtimes build from ``cfg``: the spec factory's when ``model.spec_factory`` is
    set, else ours (the LM and the modalities of ``model.modalities``, vocabulary padded for ``parallel.lm_tp``).

    A user may add or replace entries of ``modality_submodules_spec`` / ``special_token_ids`` of the result and
    pass it to :class:`mimo_ray.Trainer` as ``mimo_config``. Called inside a spec factory it returns our base spec:
    the LM and those of ``model.modalities`` we build (the factory adds its own).

    Raises:
        ValueError: ``model.modalities`` names a modality we build no spec for (and there is no factory), or the
            factory does not return a ``MimoModelConfig``.
    """
    if _IN_FACTORY:
        from mimo_ray.config import MODALITIES

        ours = [m for m in cfg.model.modalities if m in MODALITIES]
        base = mimo_config(cfg.model, modalities=ours, lm_tp=cfg.parallel.lm_tp)
        base.special_token_ids = {m: cfg.model.special_token_ids[m] for m in ours}
        return base
    if cfg.model.spec_factory:
        name = f"model.spec_factory={cfg.model.spec_factory!r}"
        return call_factory(load_spec_factory(cfg.model.spec_factory), cfg, name)
    return mimo_config(cfg.model, lm_tp=cfg.parallel.lm_tp)


def call_factory(factory: Any, cfg: Config, name: str) -> MimoModelConfig:
    """Run a spec factory (inside it, :func:`build_mimo_config` gives our base spec).

    Raises:
        TypeError: it returned something else than a ``MimoModelConfig`` (naming it).
    """
    _IN_FACTORY.append(name)
    try:
        spec = factory(cfg)
    finally:
        _IN_FACTORY.pop()
    if not isinstance(spec, MimoModelConfig):
        raise TypeError(f"{name} returned {type(spec).__name__}, not a MimoModelConfig")
    return spec


def resolve_mimo_config(cfg: Config, spec: MimoModelConfig | None) -> MimoModelConfig:
    """``spec`` when given, else :func:`build_mimo_config` (what every stage builds its part from)."""
    return spec if spec is not None else build_mimo_config(cfg)


def config_for_spec(cfg: Config, spec: MimoModelConfig) -> Config:
    """``cfg`` with ``model.modalities`` and ``model.special_token_ids`` taken from ``spec`` (the data, the routing
    and the alignment read them there), validated.

    Raises:
        ValueError: a modality of ``spec`` without a special token id, a token id outside the vocabulary, or two
            modalities sharing one id (naming them).
    """
    names = list(spec.modality_submodules_spec)
    missing = [m for m in names if m not in spec.special_token_ids]
    if missing:
        raise ValueError(
            f"MimoModelConfig.special_token_ids has no id for modalities {missing} of modality_submodules_spec"
        )
    ids = {**cfg.model.special_token_ids, **{k: int(v) for k, v in spec.special_token_ids.items()}}
    model = dataclasses.replace(cfg.model, modalities=names, special_token_ids=ids)  # __post_init__ validates
    return dataclasses.replace(cfg, model=model)


def spec_fingerprint(spec: MimoModelConfig) -> dict[str, Any]:
    """A JSON description of the spec's structure (classes by qualified name), recorded with checkpoints so a run
    rebuilt from another spec is refused with a readable difference rather than a state-dict error.
    """

    def name(cls: Any) -> str:
        return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', repr(cls))}"

    out: dict[str, Any] = {"language_model": name(spec.language_model_spec.module), "modalities": {}}
    for mod, sub in spec.modality_submodules_spec.items():
        encoders = (sub.submodules or {}).get("encoders", {}) if isinstance(sub.submodules, dict) else {}
        out["modalities"][mod] = {
            "module": name(sub.module),
            "encoders": {k: name(v.module) for k, v in encoders.items()},
            "token_id": int(spec.special_token_ids.get(mod, -1)),
        }
    return out
