"""The train job end to end on CPU: metrics, both runtimes equal, resume and recovery equal a straight run.

Recovery from a killed encoder or LM actor (and collate, decode, a torn save) is tested in one run by test_chaos.py;
here only the replay from step 0 without checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from jobs import train as train_job  # noqa: E402
from mimo_ray.config_cli import load_config  # noqa: E402
from mimo_ray.driver.ledger import SampleLedger  # noqa: E402
from mimo_ray.driver.train_loop import TrainLoop  # noqa: E402
from mimo_ray.observability import read_metrics  # noqa: E402

STEPS = 6


def _args(out, *extra):
    return ["--preset", "tiny", "--max-steps", str(STEPS), "--output-dir", str(out), "train.ckpt_interval=2", *extra]


def _ledger(out):
    """Per step, the sorted ids trained on (rank order differs between runtimes)."""
    return [(r["step"], sorted(r["ids"])) for r in SampleLedger(out).read()]


def _losses(out):
    return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["split"] == "train"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("straight")
    summary = train_job.main(_args(out))
    return out, summary


def test_disaggregated_job_writes_metrics_checkpoint_plot(straight):
    out, summary = straight
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert {"step", "loss", "tokens", "step_time_s"} <= set(records[0])
    assert all(r["tokens"] > 0 and r["step_time_s"] > 0 for r in records)
    assert summary["steps"] == STEPS and summary["runtime"] == "disaggregated"
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{STEPS:07d}"
    state = json.loads((out / "checkpoints" / latest / "driver.json").read_text())
    assert state["step"] == STEPS and state["samples_consumed"] == STEPS * 8
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    ledger = _ledger(out)
    assert [step for step, _ in ledger] == list(range(1, STEPS + 1)) and all(len(ids) == 8 for _, ids in ledger)
    assert any((out / "tb").iterdir())


def test_fused_job_gives_the_same_loss_curve(straight, tmp_path):
    out, _ = straight
    train_job.main(_args(tmp_path, "--runtime", "fused"))
    fused = _losses(tmp_path)
    assert fused == pytest.approx(_losses(out), rel=1e-6, abs=0)
    assert fused[-1] < fused[0]
    assert _ledger(tmp_path) == _ledger(out)


def test_resume_gives_the_same_losses(straight, tmp_path):
    out, _ = straight
    train_job.main(_args(tmp_path, "--max-steps", "3"))
    assert len(_losses(tmp_path)) == 3
    train_job.main(_args(tmp_path, "--resume"))
    assert _losses(tmp_path) == pytest.approx(_losses(out), rel=1e-6, abs=0)
    assert _ledger(tmp_path) == _ledger(out)


def test_bad_flag_and_missing_path_fail_before_actors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        train_job.main(["--num-frames", "zero"])
    assert err.value.code == 2 and "model.vision.num_frames='zero' is not a valid int" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--data-path '.*missing.jsonl' does not exist"):
        train_job.main(["--data-path", str(tmp_path / "missing.jsonl")])
    torch.manual_seed(0)


def test_fresh_run_over_another_runs_checkpoints_fails_before_ray(tmp_path, monkeypatch):
    import ray

    from mimo_ray.cli import train as train_cli
    from mimo_ray.config_cli import config_to_dict

    old = tmp_path / "checkpoints" / "step_0000800"
    old.mkdir(parents=True)
    (old / "COMPLETE").write_text("ok\n")
    stored = config_to_dict(load_config("tiny", ["--output-dir", str(tmp_path)]))
    (old / "driver.json").write_text(json.dumps({"step": 800, "run_id": "old", "config": stored}))

    def forbidden(*args, **kwargs):
        raise AssertionError("Ray or an actor group was started")

    monkeypatch.setattr(ray, "init", forbidden)
    monkeypatch.setattr(train_cli, "ensure_ray", forbidden)  # jobs/train.py runs mimo_ray.cli.train.main
    monkeypatch.setattr(TrainLoop, "build", forbidden)
    with pytest.raises(SystemExit) as err:
        train_job.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--max-steps", "2"])
    assert err.value.code == (
        f"error: --output-dir {str(tmp_path)!r} already holds checkpoints of another run (step_0000800 in "
        f"{tmp_path / 'checkpoints'}); pass --resume to continue that run, or choose a new --output-dir "
        "(--overwrite discards them)"
    )
    with pytest.raises(SystemExit) as err:  # a resume whose model differs from the checkpoint's
        train_job.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--resume", "--num-layers", "3"])
    assert err.value.code.startswith(f"error: cannot resume from {old}: the config differs in fields that change")
    assert "model.lm.num_layers 2 -> 3;" in err.value.code and "\n" not in err.value.code
    assert sorted(p.name for p in old.iterdir()) == ["COMPLETE", "driver.json"]  # untouched


def test_recovery_without_checkpoints_replays_from_step_0(straight, tmp_path):
    """ckpt_interval 0: a failure restarts from the seeded initial weights and data position 0, which reproduces the
    straight run exactly (so no step-0 anchor checkpoint is needed), and the summary says so."""
    from mimo_ray.runtime import build_runtime

    out, _ = straight
    fired = []

    def factory(cfg):
        runtime = build_runtime(cfg)
        step = runtime.train_step

        def flaky(micro, lr):
            if len(fired) == 0 and runtime.calls == 3:
                fired.append(True)
                raise TimeoutError("step timed out")
            runtime.calls += 1
            return step(micro, lr)

        runtime.calls = 0
        runtime.train_step = flaky
        return runtime

    cfg = load_config("tiny", ["--runtime", "fused", "--max-steps", str(STEPS), "--output-dir", str(tmp_path)])
    with TrainLoop(cfg, factory) as loop:
        summary = loop.run()
    assert [(r["step"], r["resumed_from"], r["resumed_step"]) for r in summary["recoveries"]] == [(3, None, 0)]
    assert "restarted from step 0 with the initial weights" in summary["recoveries"][0]["note"]
    assert _losses(tmp_path) == pytest.approx(_losses(out), rel=1e-6, abs=0)
