"""Run safety of the training driver (DESIGN.md C6/C12): run ids, retention and recovery within one run, the data
position read back, config checks on resume, durable commits, stale temporary dirs, recovery without checkpoints.

The driver runs for real (TrainLoop, checkpoint files, random data source) over a one-parameter fake runtime, so
these tests need neither Ray nor Megatron.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from mimo_ray.config_cli import load_config, parse_job_args
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver import run_dir, train_loop
from mimo_ray.driver.resume_rules import config_changes, is_safe
from mimo_ray.driver.train_loop import TrainLoop
from mimo_ray.observability import read_metrics


class FakeRuntime:
    """A one-parameter model: each step moves ``w`` by ``lr`` times the batch's mean token id; loss depends on ``w``
    and the batch, so a resumed or recovered run matches a straight one only with the right weights and data."""

    def __init__(self, cfg, faults: list[BaseException]) -> None:  # noqa: ANN001
        self.cfg = cfg
        self.faults = faults  # raised by the next train_step (a lost actor, a timeout)
        self.w = torch.tensor(0.0, dtype=torch.float64)
        self.loaded: list[str] = []
        self.closed = False

    def train_step(self, microbatches, lr):  # noqa: ANN001, ANN201
        if self.faults:
            raise self.faults.pop()
        x = sum(float(mb["input_ids"].double().mean()) for mb in microbatches) / len(microbatches)
        loss = float((self.w - x / 100.0) ** 2)
        self.w = self.w + lr * x
        return {"loss": loss, "num_tokens": 10, "step_time_s": 0.01, "grad_norm": 1.0}

    def eval_step(self, microbatches):  # noqa: ANN001, ANN201
        return {"loss": float(self.w), "num_tokens": 1}

    def set_data_iterators(self, iterators) -> None:  # noqa: ANN001
        pass

    def save_checkpoint(self, path: str) -> None:
        (Path(path) / "fake").mkdir()
        torch.save({"w": self.w}, Path(path) / "fake" / "tp0.pt")

    def load_checkpoint(self, path: str) -> None:
        self.w = torch.load(Path(path) / "fake" / "tp0.pt", weights_only=True)["w"]
        self.loaded.append(Path(path).name)

    def close(self) -> None:
        self.closed = True


# A constant learning rate, so a run stopped early and resumed follows the straight run's trajectory exactly.
BASE = ["--runtime", "fused", "--max-steps", "4", "train.warmup_steps=0", "train.min_lr=1e-3"]


def _cfg(out: Path, *extra: str):
    return load_config("tiny", [*BASE, "--output-dir", str(out), *extra])


def _run(cfg, hook=None, faults=None) -> tuple[dict, list[FakeRuntime]]:  # noqa: ANN001
    built: list[FakeRuntime] = []

    def factory(c):  # noqa: ANN001, ANN202
        built.append(FakeRuntime(c, faults if faults is not None else []))
        return built[-1]

    with TrainLoop(cfg, factory, on_step_start=hook) as loop:
        summary = loop.run()
    return summary, built


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def _foreign(ckpt_dir: Path, step: int, run_id: str = "another-run") -> Path:
    """A complete checkpoint of another run, with ``latest`` pointing at it (as that run's commit would)."""
    tmp = ckpt.begin(ckpt_dir, step)
    (tmp / "fake").mkdir()
    torch.save({"w": torch.tensor(123.0, dtype=torch.float64)}, tmp / "fake" / "tp0.pt")
    ckpt.write_driver_state(tmp, {"step": step, "run_id": run_id, "samples_consumed": step * 8, "config": {}})
    return ckpt.commit(ckpt_dir, tmp, step, run_id=run_id)


@pytest.fixture
def logs(caplog):
    """Records of the ``mimo_ray`` logger (which stops propagating once a job has called ``init_logging``)."""
    logger = logging.getLogger("mimo_ray")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="mimo_ray")
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary, _ = _run(_cfg(out))
    return _losses(out), summary


def test_fresh_run_into_another_runs_checkpoints_is_refused_then_overwrite(tmp_path, straight):
    _foreign(tmp_path / "checkpoints", 800)
    built = []
    with pytest.raises(run_dir.RunDirError) as err, TrainLoop(_cfg(tmp_path), built.append) as loop:
        loop.run()
    msg = str(err.value)
    assert "\n" not in msg and not built
    assert f"--output-dir {str(tmp_path)!r} already holds checkpoints of another run (step_0000800" in msg
    assert "pass --resume to continue that run, or choose a new --output-dir" in msg
    assert (tmp_path / "checkpoints" / "step_0000800" / "COMPLETE").exists()
    # --overwrite on the command line is train.overwrite: the old run's checkpoints go, the new run starts at 0.
    cfg, _ = parse_job_args(["--preset", "tiny", *BASE, "--output-dir", str(tmp_path), "--overwrite"])
    assert cfg.train.overwrite
    summary, built = _run(cfg)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000004"]
    assert built[0].loaded == [] and summary["resumed_from"] is None
    assert _losses(tmp_path) == straight[0]
    with pytest.raises(ValueError, match="train.resume and train.overwrite exclude each other"):
        load_config("tiny", ["train.resume=true", "train.overwrite=true"])


def test_run_id_recorded_and_retention_and_recovery_stay_within_the_run(tmp_path, straight):
    ckpt_dir = tmp_path / "checkpoints"
    fired, faults = [], []

    def hook(step: int) -> None:
        if step == 0:  # another run writes into the same directory after this one started
            _foreign(ckpt_dir, 800)
        if step == 3 and not fired:
            _foreign(ckpt_dir, 900)  # ... and moves `latest` to its own newest checkpoint, then this run fails
            fired.append(step)
            faults.append(TimeoutError("step timed out"))

    summary, built = _run(_cfg(tmp_path, "train.ckpt_interval=1", "train.keep_checkpoints=2"), hook, faults)
    run_id = summary["run_id"]
    assert len(run_id) == 32 and json.loads((tmp_path / "run.json").read_text())["run_id"] == run_id
    names = sorted(p.name for p in ckpt_dir.glob("step_*"))
    assert names == ["step_0000003", "step_0000004", "step_0000800", "step_0000900"]  # the other run's kept
    assert all(ckpt.run_id_of(ckpt_dir / n) == run_id for n in names[:2])
    # recovery loaded this run's newest checkpoint, never the other run's step 900 that `latest` named
    assert [r.loaded for r in built] == [[], ["step_0000003"]]
    assert summary["recoveries"] == [{"step": 3, "during": "step", "error": "TimeoutError: step timed out",
                                      "resumed_from": str(ckpt_dir / "step_0000003"), "resumed_step": 3}]  # fmt: skip
    assert _losses(tmp_path) == pytest.approx(straight[0], rel=1e-12, abs=0)


def test_retention_keeps_this_runs_newest_by_step_and_never_the_just_written(tmp_path):
    root = tmp_path / "c"
    _foreign(root, 800, "old")
    for step in (1, 2, 3):
        tmp = ckpt.begin(root, step)
        ckpt.write_driver_state(tmp, {"step": step, "run_id": "new"})
        ckpt.commit(root, tmp, step, keep=1, run_id="new")
        assert sorted(p.name for p in root.glob("step_*")) == [f"step_{step:07d}", "step_0000800"]
    assert ckpt.latest(root).name == "step_0000003"
    assert ckpt.latest(root, "old", any_run=False).name == "step_0000800"
    assert ckpt.latest(root, "nobody", any_run=False) is None
    # a step of another run is never replaced by this run's checkpoint of the same step
    tmp = ckpt.begin(root, 800)
    ckpt.write_driver_state(tmp, {"step": 800, "run_id": "new"})
    with pytest.raises(RuntimeError, match="step_0000800 belongs to run 'old', not to this run 'new'"):
        ckpt.commit(root, tmp, 800, run_id="new")


def test_resume_refuses_an_incompatible_config_naming_the_fields(tmp_path):
    _run(_cfg(tmp_path, "--max-steps", "2"))
    built = []
    cfg = _cfg(tmp_path, "--resume", "--num-layers", "3", "data.seed=7")
    with pytest.raises(ValueError) as err, TrainLoop(cfg, built.append) as loop:
        loop.run()
    msg = str(err.value)
    assert not built and "\n" not in msg
    assert msg.startswith(f"cannot resume from {tmp_path / 'checkpoints' / 'step_0000002'}: the config differs")
    assert "data.seed 1234 -> 7, model.lm.num_layers 2 -> 3;" in msg
    assert not is_safe("data.global_batch_size") and not is_safe("parallel.encoder_groups")
    assert not is_safe("train.seed")
    assert is_safe("parallel.lm_tp") and is_safe("parallel.encoder_dp")  # stage ranks reshard (stages/reshard.py)
    assert not is_safe("train.weight_decay")  # restored from the optimizer state: a change would be ignored
    assert is_safe("train.max_steps") and is_safe("infer.batch_size") and is_safe("cluster.num_cpus")


def test_resume_with_safe_changes_proceeds_and_logs(tmp_path, straight, logs):
    _run(_cfg(tmp_path, "--max-steps", "2"))
    summary, built = _run(_cfg(tmp_path, "--resume", "train.eval_interval=0", "--lr", "1e-3"))
    assert built[0].loaded == ["step_0000002"] and summary["steps"] == 4
    assert summary["config_changes"] == {"train.max_steps": [2, 4]}
    assert any("train.max_steps changed 2 -> 4 (allowed)" in r.getMessage() for r in logs.records)
    first = json.loads((tmp_path / "checkpoints" / "step_0000002" / "driver.json").read_text())["run_id"]
    assert summary["run_id"] == first  # the resumed run continues the lineage
    assert _losses(tmp_path) == pytest.approx(straight[0], rel=1e-12, abs=0)
    logs.clear()
    summary, _ = _run(_cfg(tmp_path, "--resume", "--max-steps", "5", "--lr", "2e-3"))
    assert summary["config_changes"] == {"train.lr": [0.001, 0.002], "train.max_steps": [4, 5]}
    assert any("train.lr changed 0.001 -> 0.002 (allowed)" in r.getMessage() for r in logs.records)


def test_resume_reads_the_recorded_data_position(tmp_path, monkeypatch):
    _run(_cfg(tmp_path, "--max-steps", "2"))
    state_file = tmp_path / "checkpoints" / "step_0000002" / "driver.json"
    state = json.loads(state_file.read_text())
    assert state["samples_consumed"] == 16
    state["samples_consumed"] = 40  # e.g. rows skipped by the data source: the position is not step * batch
    state_file.write_text(json.dumps(state))
    starts = []
    real = train_loop.build_data_source

    def spy(cfg, split, start_sample=0, **kwargs):  # noqa: ANN001, ANN202
        starts.append((split, start_sample))
        return real(cfg, split, start_sample=start_sample, **kwargs)

    monkeypatch.setattr(train_loop, "build_data_source", spy)
    summary, _ = _run(_cfg(tmp_path, "--resume"))
    assert starts == [("train", 40)]
    assert summary["samples"] == 40 + 2 * 8
    step4 = json.loads((tmp_path / "checkpoints" / "step_0000004" / "driver.json").read_text())
    assert step4["samples_consumed"] == 56
    cfg = _cfg(tmp_path)
    assert run_dir.start_sample({"step": 3, "samples_consumed": 17}, cfg) == 17
    assert run_dir.start_sample({"step": 3}, cfg) == 24  # a checkpoint written before the position was recorded
    assert run_dir.start_sample(None, cfg) == 0


def test_stale_temporary_dirs_are_removed_at_start(tmp_path):
    _run(_cfg(tmp_path, "--max-steps", "2"))
    stale = tmp_path / "checkpoints" / ".tmp-step_0000003-4242"
    (stale / "lm").mkdir(parents=True)
    (stale / "lm" / "tp0.pt").write_bytes(b"half a file")
    (tmp_path / "checkpoints" / ".latest.tmp").write_text("step_0000003\n")
    _run(_cfg(tmp_path, "--resume"))
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["latest", "step_0000002", "step_0000004"]


def test_commit_fsyncs_every_file_and_dir_before_the_rename(tmp_path, monkeypatch):
    root = Path(os.path.realpath(tmp_path)) / "checkpoints"
    tmp = ckpt.begin(root, 5)
    for group in ("encoder-video", "lm"):
        (tmp / group).mkdir()
        torch.save({"x": torch.ones(2)}, tmp / group / "tp0.pt")  # written by the stage ranks
    ckpt.write_driver_state(tmp, {"step": 5, "run_id": "r"})
    tree = {str(p) for p in tmp.rglob("*")} | {str(tmp), str(tmp / ckpt.COMPLETE)}
    assert len(tree) == 8  # 2 shards, driver.json, driver_rng.pt, COMPLETE; 2 group dirs and the dir itself
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:  # noqa: ANN001
        events.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    ckpt.commit(root, tmp, 5, run_id="r")
    rename = events.index(("replace", str(tmp)))
    assert {p for _, p in events[:rename]} == tree  # every file and directory, each before the rename
    pointer = events.index(("replace", str(root / ".latest.tmp")))
    assert events[rename + 1 : pointer + 1] == [("fsync", str(root)), ("fsync", str(root / ".latest.tmp")),
                                                ("replace", str(root / ".latest.tmp"))]  # fmt: skip
    assert events[pointer + 1] == ("fsync", str(root))


def test_recovery_without_any_checkpoint_restarts_from_step_0_and_says_so(tmp_path, straight, logs):
    fired, faults = [], []

    def hook(step: int) -> None:
        if step == 2 and not fired:
            fired.append(step)
            faults.append(TimeoutError("lm actor lost"))

    summary, built = _run(_cfg(tmp_path), hook, faults)
    assert [r.loaded for r in built] == [[], []]
    (rec,) = summary["recoveries"]
    assert rec["resumed_from"] is None and rec["resumed_step"] == 0 and rec["step"] == 2
    assert rec["note"] == (f"no checkpoint of run {summary['run_id']} in {tmp_path / 'checkpoints'} "
                           "(train.ckpt_interval=0): restarted from step 0 with the initial weights")  # fmt: skip
    assert any(r.levelno == logging.WARNING and "restarted from step 0" in r.getMessage() for r in logs.records)
    assert json.loads((tmp_path / "summary.json").read_text())["recoveries"] == [rec]
    assert _losses(tmp_path) == pytest.approx(straight[0], rel=1e-12, abs=0)


def test_config_changes_compare_missing_fields_as_defaults():
    cfg = load_config("tiny")
    from mimo_ray.config_cli import config_to_dict

    current = config_to_dict(cfg)
    stored = json.loads(json.dumps(current))
    del stored["train"]["keep_checkpoints"]  # written by code that did not have the field yet
    assert config_changes(stored, current) == {}
    stored["train"]["resume"] = True  # how a run was started is not a change
    assert config_changes(stored, current) == {}


def test_recovery_waits_under_its_own_deadline_and_counts_only_real_failures(tmp_path, straight):
    """The rebuild's placement gets train.recovery_timeout_s; a rebuild that fails for real counts and is retried;
    one failure beyond train.max_failures ends the run naming the last."""
    cfgs, built, fired = [], [], []
    rebuild_faults = [TimeoutError("encoder actor died while starting")]

    def factory(c):  # noqa: ANN001, ANN202
        cfgs.append(c)
        if len(cfgs) == 2 and rebuild_faults:  # the first rebuild fails, the second succeeds
            raise rebuild_faults.pop()
        built.append(FakeRuntime(c, faults))
        return built[-1]

    faults: list[BaseException] = []

    def hook(step: int) -> None:
        if step == 2 and not fired:
            fired.append(step)
            faults.append(TimeoutError("lm node lost"))

    cfg = _cfg(tmp_path, "train.ckpt_interval=1", "train.max_failures=2", "parallel.placement_timeout_s=60",
               "train.recovery_timeout_s=900")  # fmt: skip
    with TrainLoop(cfg, factory, on_step_start=hook) as loop:
        summary = loop.run()
    assert [c.parallel.placement_timeout_s for c in cfgs] == [60, 900, 900]
    assert summary["failures"] == [
        "step 2: TimeoutError: lm node lost",
        "recovery after step 2: TimeoutError: encoder actor died while starting",
    ]
    assert [r.loaded for r in built] == [[], ["step_0000002"]]
    assert _losses(tmp_path) == pytest.approx(straight[0], rel=1e-12, abs=0)

    out = tmp_path / "again"
    always = [TimeoutError(f"rebuild {i}") for i in range(5)]

    def failing(c):  # noqa: ANN001, ANN202
        if always and c.parallel.placement_timeout_s == 900:
            raise always.pop(0)
        return FakeRuntime(c, faults)

    fired.clear()
    with pytest.raises(RuntimeError) as err, TrainLoop(_cfg(out, "train.ckpt_interval=1", "train.max_failures=2",
                                                            "train.recovery_timeout_s=900"), failing,
                                                       on_step_start=hook) as loop:  # fmt: skip
        loop.run()
    assert str(err.value) == ("giving up after 2 recoveries (train.max_failures=2); last failure at recovery after "
                              "step 2: rebuild 1")  # fmt: skip
