"""``mimo_ray.Trainer``: train a MIMO model from a Python driver script, on a user's own ModuleSpecs and data.

    cfg = mimo_ray.load_config("tiny", ["train.max_steps=5"])
    spec = mimo_ray.build_mimo_config(cfg)                     # add / replace modality_submodules_spec entries
    with mimo_ray.Trainer(cfg, mimo_config=spec, data=batches) as trainer:
        result = trainer.fit()                                 # {"losses": [...], "steps": 5, "checkpoint": ...}

The trainer starts an embedded Ray (or attaches to the cluster named by ``RAY_ADDRESS`` / ``cluster.address``, as
the jobs do) and, on exit — also on an exception — ends every actor it started and the Ray it started. Both runtimes
(``train.runtime``) build the user's spec: the encoder group(s) its ``modality_submodules_spec``, the LM group its
language model, every part seeded from its name, so the weights and the losses are the same in both.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from megatron.core.models.mimo import MimoModelConfig

from mimo_ray.config import Config
from mimo_ray.model.spec_source import build_mimo_config, call_factory, config_for_spec, spec_fingerprint

log = logging.getLogger("mimo_ray")

#: What ``mimo_config`` may be: a ``MimoModelConfig``, a function of the Config returning one, or its import path.
SpecLike = MimoModelConfig | Callable[[Config], MimoModelConfig] | str | None


def resolve_spec(cfg: Config, mimo_config: SpecLike) -> tuple[Config, MimoModelConfig, dict[str, Any]]:
    """The run's spec, the config that agrees with it, and what checkpoints record about it.

    Args:
        cfg: the config.
        mimo_config: ``None`` (ours, or ``model.spec_factory``'s), a ``MimoModelConfig``, a factory function
            (recorded as ``model.spec_factory`` when it is importable, i.e. not defined in ``__main__``) or
            ``"package.module:function"``.

    Returns:
        ``(cfg with model.modalities / special_token_ids / spec_factory set, spec, record)``; the record is
        ``{"source": "config" | "factory" | "object", "factory": path | None, "structure": {...}}``.

    Raises:
        ValueError / TypeError: an unusable ``mimo_config`` (naming what it got).
    """
    import dataclasses

    if isinstance(mimo_config, str):
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, spec_factory=mimo_config))
        mimo_config = None
    elif callable(mimo_config) and not isinstance(mimo_config, MimoModelConfig):
        module = getattr(mimo_config, "__module__", "__main__")
        qualname = getattr(mimo_config, "__qualname__", "")
        if module != "__main__" and "<" not in qualname:
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, spec_factory=f"{module}:{qualname}")
            )
        mimo_config = call_factory(mimo_config, cfg, f"mimo_config factory {qualname or mimo_config!r}")
    if mimo_config is None:
        spec = build_mimo_config(cfg)
        source = "factory" if cfg.model.spec_factory else "config"
    elif isinstance(mimo_config, MimoModelConfig):
        spec = mimo_config
        source = "factory" if cfg.model.spec_factory else "object"
    else:
        raise TypeError(f"mimo_config must be a MimoModelConfig, a function returning one or an import path, got "
                        f"{type(mimo_config).__name__}")
    cfg = config_for_spec(cfg, spec)
    record = {"source": source, "factory": cfg.model.spec_factory, "structure": spec_fingerprint(spec)}
    return cfg, spec, record


def _dataset_manifest(dataset: Any, out_dir: Path) -> str:
    """A ``ray.data.Dataset`` of manifest rows → ``<output_dir>/dataset_manifest.jsonl`` (rows are small: ids,
    paths, conversations), read by the same decode pipeline (epoch plan, quarantine, resume) as a manifest file.
    """
    import numpy as np

    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return [plain(v) for v in value.tolist()]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        if isinstance(value, np.generic):
            return value.item()
        return value

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "dataset_manifest.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w") as fh:
        for row in dataset.iter_rows():
            fh.write(json.dumps(plain(dict(row))) + "\n")
    tmp.replace(path)
    return str(path)


class Trainer:
    """Train from Python (DESIGN.md C13).

    Args:
        cfg: the config (:func:`mimo_ray.load_config`); ``train.runtime`` picks fused or disaggregated.
        mimo_config: the model: ``None`` (:func:`mimo_ray.build_mimo_config` of ``cfg``), a ``MimoModelConfig``
            (any modality names, ``ModalitySubmodules`` subclasses, several encoders per modality, classes from the
            driver script's ``__main__`` included), a function ``cfg -> MimoModelConfig`` or its import path
            ``"package.module:function"`` (recorded as ``model.spec_factory``, so ``jobs/train.py --resume`` and
            ``jobs/infer.py`` rebuild the model alone; a ``MimoModelConfig`` object must be passed again to resume
            or to :func:`mimo_ray.generate`).
        data: ``None`` (``data.data_path``, or random batches of our modalities), a manifest path, a
            ``ray.data.Dataset`` of manifest rows, or any iterable of C1 global batches (see
            :mod:`mimo_ray.data.user_batches`; a re-iterable object is needed for more than one pass and for
            recovery).
        decoders: ``{user modality: row -> {encoder: {kwarg: array [k, ...]}}}``: decode functions for manifest
            rows of user modalities, run in the Ray Data decode workers under the quarantine
            (:mod:`mimo_ray.data.decode_hooks`; ``data.decoders`` names importable ones in the config).
        on_step_start: optional ``step -> fault description | None`` hook (fault injection, see ``TrainLoop``).

    Raises:
        ValueError / TypeError: a bad config, spec or data argument, before any actor starts.
    """

    def __init__(
        self,
        cfg: Config,
        mimo_config: SpecLike = None,
        data: str | os.PathLike | Iterable | Any | None = None,
        *,
        decoders: dict[str, Callable[[dict[str, Any]], Any]] | None = None,
        on_step_start: Callable[[int], Any] | None = None,
    ) -> None:
        import dataclasses

        self.cfg, self.spec, self.spec_record = resolve_spec(cfg, mimo_config)
        self._batches: Any = None
        self._dataset: Any = None
        if isinstance(data, str | os.PathLike):
            if not Path(data).exists():
                raise ValueError(f"data={str(data)!r} does not exist")
            self.cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, data_path=str(data)))
        elif data is not None and type(data).__module__.startswith("ray.data"):
            self._dataset = data
        elif data is not None:
            if isinstance(data, dict) or not (hasattr(data, "__iter__") or callable(data)):
                raise TypeError(f"data must be a manifest path, a ray.data.Dataset or an iterable of C1 global "
                                f"batches, got {type(data).__name__}")
            self._batches = data
        self.on_step_start = on_step_start
        unknown = [m for m in (decoders or {}) if m not in self.cfg.model.modalities]
        if unknown:
            raise ValueError(f"decoders for {unknown}, which are not modalities of the model "
                             f"({self.cfg.model.modalities})")
        self.decoders = dict(decoders or {})
        self._started_ray = False
        self._loop: Any = None
        self.summary: dict[str, Any] | None = None

    # ----- lifetime
    def _ensure_ray(self) -> None:
        import ray

        if not ray.is_initialized():
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(**self.cfg.cluster.init_kwargs(), log_to_driver=True)
            self._started_ray = True

    def __enter__(self) -> Trainer:
        self._ensure_ray()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End every actor and data worker of this trainer, and the Ray instance it started (idempotent)."""
        if self._loop is not None:
            self._loop.close()
            self._loop = None
        if self._started_ray:
            import ray

            from mimo_ray.data.ray_dataset import settle_ray_data_threads

            settle_ray_data_threads()  # no Ray Data thread may touch Ray after the shutdown
            ray.shutdown()
            self._started_ray = False

    # ----- training
    def _data_factory(self) -> Callable[..., Any] | None:
        if self._batches is None:
            return None
        from mimo_ray.data.user_batches import IterableBatchSource
        from mimo_ray.driver.data_sources import build_data_source

        batches = self._batches

        def factory(cfg: Config, split: str, start_sample: int = 0, data_state: Any = None) -> Any:
            if split != "train":
                return build_data_source(cfg, split, start_sample, data_state)
            return IterableBatchSource(cfg, batches, start_sample)

        return factory

    def fit(self) -> dict[str, Any]:
        """Train to ``train.max_steps`` (continuing the run in ``train.output_dir`` with ``train.resume``).

        Returns:
            The run summary (as ``summary.json``) plus ``losses`` (one float per optimizer step, steps 1…N of the
            run), ``steps`` and ``checkpoint`` (the last checkpoint directory, or ``None``).
        """
        import dataclasses

        from mimo_ray.driver.train_loop import TrainLoop
        from mimo_ray.observability import read_metrics
        from mimo_ray.runtime import build_runtime

        self._ensure_ray()
        if self._dataset is not None:
            path = _dataset_manifest(self._dataset, Path(self.cfg.train.output_dir))
            self.cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, data_path=path))
            self._dataset = None
        spec = self.spec
        from mimo_ray.data.decode_hooks import register

        register(self.decoders)
        self._loop = TrainLoop(
            self.cfg,
            lambda cfg: build_runtime(cfg, spec),
            self.on_step_start,
            data_factory=self._data_factory(),
            spec_record=self.spec_record,
        )
        try:
            summary = self._loop.run()
        finally:
            self._loop.close()
            self._loop = None
            register(None)
        records = [r for r in read_metrics(Path(self.cfg.train.output_dir) / "metrics.jsonl")
                   if r.get("split") == "train"]
        by_step = {int(r["step"]): float(r["loss"]) for r in records}
        summary["losses"] = [by_step[s] for s in sorted(by_step)]
        summary["checkpoint"] = summary.get("checkpoint") if summary.get("checkpoint") not in (None, "None") else None
        self.summary = summary
        return summary
