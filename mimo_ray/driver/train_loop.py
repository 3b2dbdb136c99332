"""The training driver: data → runtime (fused or disaggregated) → metrics, checkpoints, eval and recovery.

    with TrainLoop.build(cfg) as loop:
        summary = loop.run()

Recovery (DESIGN.md C7): a dead actor, a failed transfer or a step timeout tears every group down, rebuilds
them, loads this run's newest checkpoint and continues, at most ``train.max_failures`` times; with none it restarts
from step 0 and says so (``summary["recoveries"]``). Run safety (C12, ``run_dir.py``): a run has a ``run_id``;
it never lands on, prunes or loads another run's checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mimo_ray.config import Config
from mimo_ray.config_cli import config_to_dict, save_config
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver import run_dir
from mimo_ray.driver.data_sources import build_data_source
from mimo_ray.driver.ledger import SampleLedger
from mimo_ray.driver.schedule import lr_at
from mimo_ray.observability import MetricsWriter, plot_metrics

log = logging.getLogger("mimo_ray")


def is_recoverable(err: BaseException) -> bool:
    """Whether an error from a step is an infrastructure failure (rebuild and resume) rather than a bug or bad data.

    Dead actors, lost objects, timeouts and transport errors are recoverable; an exception raised by our own code
    inside an actor (``RayTaskError`` wrapping e.g. ``ValueError``) is not, unless it is a transport error.
    """
    import ray.exceptions as rex

    if isinstance(err, (rex.RayActorError, rex.GetTimeoutError, rex.ObjectLostError, TimeoutError)):
        return True
    if isinstance(err, rex.RayTaskError):
        cause = err.cause
        return isinstance(cause, (rex.RayActorError, rex.ObjectLostError, ConnectionError, TimeoutError))
    return isinstance(err, ConnectionError)


def checkpoint_extras(cfg: Config, data: Any) -> dict[str, Any]:
    """Tokenizer, chat template, special-token ids and data position for a checkpoint, so inference and resume can
    never drift from training (random data still records the tokenizer the config implies).
    """
    if hasattr(data, "checkpoint_extras"):
        return data.checkpoint_extras()
    from mimo_ray.data.tokenizer import ChatTokenizer

    tok = ChatTokenizer.from_config(cfg).to_dict()
    return {"tokenizer": tok, "chat_template": tok["chat_template"], "special_token_ids": tok["special_tokens"]}


class TrainLoop:
    """Owns the runtime, the data source, metrics and checkpoints of one training run.

    Args:
        cfg: the resolved config.
        runtime_factory: builds a runtime from the config (``mimo_ray.runtime.build_runtime``).
        on_step_start: optional hook called with the step index before each step (tests inject faults here).
            It may return a description (or a list of them) of faults it injected; they are listed in the summary
            (``injected_faults``) next to the failures the driver saw and recovered from.
        data_factory: builds a split's data source, ``(cfg, split, start_sample, data_state) -> source``
            (default :func:`~mimo_ray.driver.data_sources.build_data_source`); a source with ``driver_fed = True``
            hands its micro-batches to the runtime from the driver in both runtimes.
        spec_record: what every checkpoint records about the model's spec (``driver.json`` ``"spec"``: where it
            came from and its structure), so inference and resume can rebuild or refuse it.
    """

    def __init__(
        self,
        cfg: Config,
        runtime_factory: Callable[[Config], Any],
        on_step_start: Callable[[int], str | list[str] | None] | None = None,
        data_factory: Callable[..., Any] | None = None,
        spec_record: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.data_factory = data_factory or build_data_source
        self.spec_record = spec_record
        self.out = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.runtime_factory = runtime_factory
        self.on_step_start = on_step_start
        self.runtime: Any = None
        self.data: Any = None
        self.step = 0
        self.samples = 0  # training samples consumed (the data position a checkpoint records)
        self.run_id: str | None = None  # set at the first start: new, or the resumed checkpoint's
        self.resumed_from: Path | None = None
        self.init_dir: Path | None = None  # train.init_from, in the imported layout inside this run's folder
        self.config_changes: dict[str, tuple[Any, Any]] = {}
        self.failures: list[str] = []
        self.recoveries: list[dict[str, Any]] = []
        self.injected_faults: list[dict[str, Any]] = []
        self._eval_cache: list[list[Any]] | None = None
        self.metrics = MetricsWriter(self.out)
        self.ledger = SampleLedger(self.out)

    @classmethod
    def build(cls, cfg: Config, on_step_start: Callable[[int], str | list[str] | None] | None = None) -> TrainLoop:
        """A loop over :func:`mimo_ray.runtime.build_runtime`."""
        from mimo_ray.runtime import build_runtime

        return cls(cfg, build_runtime, on_step_start)

    def __enter__(self) -> TrainLoop:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release actors, data workers and writers."""
        self._close_parts()
        self.metrics.close()

    # ---------------------------------------------------------------- set-up / resume
    def _resume_point(self) -> Path | None:
        """The checkpoint to load: at the first start any run's ``latest`` (``--resume`` continues what the directory
        holds); at a recovery only this run's newest, else the checkpoint this process resumed from.
        """
        if self.run_id is None:
            return ckpt.latest(self.ckpt_dir)
        found = ckpt.latest(self.ckpt_dir, self.run_id, any_run=False)
        if found is None and self.resumed_from is not None and ckpt.is_complete(self.resumed_from):
            return self.resumed_from  # a checkpoint written before run ids existed, which this run continues
        return found

    def _start(self, resume: bool, recovering: bool = False) -> Path | None:
        """Build the runtime and data source, from this run's newest checkpoint when resuming.

        Args:
            resume: load this run's newest checkpoint (if any).
            recovering: a rebuild after a failure: the placement groups may wait ``train.recovery_timeout_s`` for
                the cluster (an autoscaler replacing a lost node) instead of ``parallel.placement_timeout_s``.

        Returns:
            The checkpoint loaded, or ``None`` (a start from step 0).
        """
        ckpt.remove_stale_tmp(self.ckpt_dir)
        found = self._resume_point() if resume else None
        state = ckpt.driver_state(found) if found is not None else None
        if found is None and self.cfg.train.init_from and self.init_dir is None:
            from mimo_ray.driver.init_from import prepare_init  # before any actor: a bad source fails fast

            self.init_dir = prepare_init(self.cfg)
        if self.run_id is None:  # first start: a resume adopts the checkpoint's run id, so its lineage continues
            self.run_id = (state or {}).get("run_id") or run_dir.new_run_id()
            self.resumed_from = found
            run_dir.write_run_file(self.out, self.run_id, str(found) if found else None, self._init_record())
            how = f"resumed from {found}" if found else "started from step 0"
            if found is None and self.init_dir is not None:
                how += f" with the weights of {self._init_record()['checkpoint']}"
            log.info("run %s %s", self.run_id, how)
        self.runtime = self.runtime_factory(self._recovery_config() if recovering else self.cfg)
        self.step = int(state["step"]) if state else 0
        self.samples = run_dir.start_sample(state, self.cfg)
        data_state = state.get("data_state") if state else None  # bad-row memory + exact plan position (manifests)
        if found is not None:
            ckpt.restore_driver_rng(found)
            self.runtime.load_checkpoint(str(found))
            log.info("resumed from %s (step %d, %d samples consumed)", found, self.step, self.samples)
        elif self.init_dir is not None:  # a new run (or a recovery before its first checkpoint): weights only
            self.runtime.load_checkpoint(str(self.init_dir))
        self.metrics.truncate_after(self.step)
        self.ledger.truncate_after(self.step)
        if self.cfg.train.eval_interval and self.cfg.data.val_path:
            # Decode the val batches before the train streams hold the decode workers: a second Ray Data
            # pipeline started later would wait for CPUs the first one keeps (a silent starvation, NOTES §3).
            self._eval_batches()
        self.data = self.data_factory(self.cfg, "train", start_sample=self.samples, data_state=data_state)
        if self.cfg.train.runtime == "disaggregated" and not getattr(self.data, "driver_fed", False):
            self.runtime.set_data_iterators(self.data.rank_streams(self.cfg.parallel.encoder_dp))
        return found

    def _init_record(self) -> dict[str, Any] | None:
        """``{"checkpoint", "modules"}`` of ``train.init_from`` when this run started from it, else ``None``."""
        if self.init_dir is None:
            return None
        from mimo_ray.driver.init_from import init_record

        return init_record(self.init_dir)

    def _recovery_config(self) -> Config:
        """The config a rebuild runs with: placement waits ``train.recovery_timeout_s`` (when longer)."""
        par = self.cfg.parallel
        wait = max(par.placement_timeout_s, self.cfg.train.recovery_timeout_s)
        return dataclasses.replace(self.cfg, parallel=dataclasses.replace(par, placement_timeout_s=wait))

    def _count_failure(self, err: BaseException, where: str) -> None:
        """Record a real failure; more than ``train.max_failures`` of them end the run."""
        self.failures.append(f"{where}: {type(err).__name__}: {err}")
        if len(self.failures) > self.cfg.train.max_failures:
            raise RuntimeError(
                f"giving up after {len(self.failures) - 1} recoveries (train.max_failures="
                f"{self.cfg.train.max_failures}); last failure at {where}: {err}"
            ) from err

    def _recover(self, err: BaseException, during: str = "step") -> None:
        """Rebuild every group from this run's latest checkpoint after a real failure.

        Waiting for resources is not a failure: the rebuild's placement waits ``train.recovery_timeout_s`` (an
        autoscaler bringing a replacement node) and is not counted; a rebuild that fails for real (an actor dying
        while it starts) counts and is retried.

        Raises:
            RuntimeError: more than ``train.max_failures`` real failures.
            InsufficientResourcesError: the cluster could not place the groups within ``train.recovery_timeout_s``.
        """
        failed_at = self.step
        where = f"step {failed_at}" if during == "step" else f"{during} after step {failed_at}"
        self._count_failure(err, where)
        log.warning("%s failed (%s: %s); rebuilding all groups from latest", where, type(err).__name__, err)
        while True:
            self._close_parts()
            try:
                found = self._start(resume=True, recovering=True)
                break
            except Exception as again:  # noqa: BLE001 - classified right below
                if not is_recoverable(again):
                    raise
                self._count_failure(again, f"recovery after step {failed_at}")
                log.warning("recovery failed (%s: %s); rebuilding again", type(again).__name__, again)
        record = {"step": failed_at, "during": during, "error": f"{type(err).__name__}: {err}",
                  "resumed_from": str(found) if found else None, "resumed_step": self.step}  # fmt: skip
        if found is None:
            record["note"] = (
                f"no checkpoint of run {self.run_id} in {self.ckpt_dir} (train.ckpt_interval="
                f"{self.cfg.train.ckpt_interval}): restarted from step 0 with the initial weights"
                + (f" (train.init_from={self.cfg.train.init_from})" if self.init_dir is not None else "")
            )
            log.warning("recovery at step %d: %s", failed_at, record["note"])
        self.recoveries.append(record)

    def _close_parts(self) -> None:
        """Close the runtime and the data source (ending their actors and placement groups)."""
        if self.runtime is not None:
            self.runtime.close()
            self.runtime = None
        if self.data is not None:
            self.data.close()
            self.data = None

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step_<N>`` atomically and durably, point ``latest`` at it, prune this run's oldest."""
        tmp = ckpt.begin(self.ckpt_dir, self.step)
        self.runtime.save_checkpoint(str(tmp))
        state = {
            "step": self.step,
            "run_id": self.run_id,
            "samples_consumed": self.samples,
            "config": config_to_dict(self.cfg),
        }
        state.update(checkpoint_extras(self.cfg, self.data))
        if self.spec_record is not None:
            state["spec"] = self.spec_record
        ckpt.write_driver_state(tmp, state)
        save_config(self.cfg, tmp / "config.yaml")
        return ckpt.commit(self.ckpt_dir, tmp, self.step, keep=self.cfg.train.keep_checkpoints, run_id=self.run_id)

    # ---------------------------------------------------------------- the loop
    def _train_step(self) -> dict[str, Any]:
        lr = lr_at(self.cfg.train, self.step)
        if self.cfg.train.runtime == "fused" or getattr(self.data, "driver_fed", False):
            result = self.runtime.train_step(self.data.next_step(), lr)
        else:
            result = self.runtime.train_step(None, lr)
            self.data.advance(1)
        return {**result, "lr": lr}

    def _eval_batches(self) -> list[list[Any]]:
        """The val split's first ``train.eval_batches`` global batches, decoded once and reused by every eval."""
        if self._eval_cache is None:
            source = self.data_factory(self.cfg, "val", start_sample=0)
            try:
                self._eval_cache = []
                for _ in range(self.cfg.train.eval_batches):
                    micro = source.next_step()
                    if not micro:  # a val split shorter than eval_batches global batches
                        break
                    self._eval_cache.append(micro)
            finally:
                source.close()
        return self._eval_cache

    def evaluate(self) -> dict[str, float]:
        """Mean per-token loss over the cached val batches (the same samples at every eval)."""
        totals: dict[str, float] = {}
        tokens = 0
        for micro in self._eval_batches():
            res = self.runtime.eval_step(micro)
            for key in (k for k in res if k == "loss" or k.endswith("_loss")):
                totals[key] = totals.get(key, 0.0) + res[key] * res["num_tokens"]
            tokens += res["num_tokens"]
        return {**{k: v / max(tokens, 1) for k, v in totals.items()}, "num_tokens": tokens}

    def run(self) -> dict[str, Any]:
        """Train to ``train.max_steps``; returns the summary (also written to ``summary.json``)."""
        cfg = self.cfg
        self.config_changes = run_dir.prepare_output_dir(cfg)  # refuses another run's checkpoints before any actor
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "config.yaml")
        self._start(resume=cfg.train.resume)
        t0 = time.perf_counter()
        self._tokens = 0
        bar = tqdm(total=cfg.train.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        last_ckpt: Path | None = None
        while True:
            last_ckpt = self._train_to_end(bar, last_ckpt)
            newest = ckpt.latest(self.ckpt_dir, self.run_id, any_run=False)
            if last_ckpt is not None and newest == ckpt.step_dir(self.ckpt_dir, self.step):
                break
            last_ckpt = self._try_save()  # the final checkpoint; a failed save recovers and trains again
            if last_ckpt is not None:
                break
            bar.n = self.step
        bar.close()
        return self._summary(time.perf_counter() - t0, self._tokens, last_ckpt)

    def _try_save(self) -> Path | None:
        """:meth:`save_checkpoint`; an infrastructure failure half-way (a dead rank) recovers like a failed step
        (the torn temporary directory is never renamed, and is removed at the restart) and returns ``None``.
        """
        try:
            return self.save_checkpoint()
        except Exception as err:  # noqa: BLE001 - classified right below
            if not is_recoverable(err):
                raise
            self._recover(err, during="checkpoint save")
            return None

    def _train_to_end(self, bar: Any, last_ckpt: Path | None) -> Path | None:
        """Step until ``train.max_steps`` with periodic eval and checkpoints; returns the newest checkpoint taken."""
        cfg = self.cfg
        while self.step < cfg.train.max_steps:
            if self.on_step_start is not None:
                self.record_faults(self.on_step_start(self.step))
            try:
                result = self._train_step()
            except Exception as err:  # noqa: BLE001 - classified right below
                if not is_recoverable(err):
                    raise
                self._recover(err)
                bar.n = self.step
                continue
            self.step += 1
            self.samples += cfg.data.global_batch_size
            self._tokens += int(result["num_tokens"])
            record = {
                "step": self.step,
                "split": "train",
                "loss": float(result["loss"]),
                "tokens": int(result["num_tokens"]),
                "step_time_s": float(result["step_time_s"]),
                "tokens_per_s": float(result["num_tokens"]) / max(float(result["step_time_s"]), 1e-9),
                "grad_norm": float(result["grad_norm"]),
                "lr": float(result["lr"]),
                **{k: float(v) for k, v in result.items() if k.endswith("_loss")},  # per output decoder + text
                **{k: float(result[k]) for k in ("loss_scale", "skipped_step") if k in result},  # fp16 only
            }
            self.metrics.write(record)
            self.ledger.write(self.step, result.get("sample_ids", []))
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and cfg.data.val_path:
                ev = self.evaluate()
                self.metrics.write({"step": self.step, "split": "val", **ev}, prefix="val")
            if cfg.train.ckpt_interval and self.step % cfg.train.ckpt_interval == 0:
                saved = self._try_save()
                if saved is None:
                    bar.n = self.step
                    continue
                last_ckpt = saved
        return last_ckpt

    def record_faults(self, what: str | list[str] | None) -> None:
        """List faults injected from outside (chaos tests, operators) in the summary, at the current step.

        Args:
            what: a description, a list of them, or ``None`` (nothing injected).
        """
        for text in [what] if isinstance(what, str) else what or []:
            log.warning("fault injected at step %d: %s", self.step, text)
            self.injected_faults.append({"step": self.step, "fault": text})

    def _summary(self, wall_s: float, tokens: int, last_ckpt: Path) -> dict[str, Any]:
        from mimo_ray.observability import read_metrics

        records = [r for r in read_metrics(self.metrics.path) if r.get("split") == "train"]
        plot = plot_metrics(self.metrics.path, self.out / "metrics.png") if records else None
        summary = {
            "steps": self.step,
            "samples": self.samples,
            "final_loss": records[-1]["loss"] if records else None,
            "tokens_per_s": tokens / max(wall_s, 1e-9),
            "wall_s": wall_s,
            "quarantined": int(getattr(self.data, "quarantined", 0)),
            "failures": self.failures,
            "recoveries": self.recoveries,
            "injected_faults": self.injected_faults,
            "run_id": self.run_id,
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "init_from": self._init_record(),
            "config_changes": {k: [old, new] for k, (old, new) in self.config_changes.items()},
            "checkpoint": str(last_ckpt),
            "plot": str(plot) if plot else None,
            "runtime": self.cfg.train.runtime,
            **(self.runtime.param_counts() if hasattr(self.runtime, "param_counts") else {}),
            "frozen_parts": list(self.cfg.model.freeze),
        }
        import json

        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary
