"""Chaos: one disaggregated run on real clips in which the driver kills, at seeded random steps, an encoder actor, an
LM actor, the collate actor and a decode worker, and tears one checkpoint save half-way. The run must end on the loss
of an uninterrupted (fused) run, train on exactly the same sample ids step by step (none twice, none skipped), and
list every failure it recovered from in its summary."""

import json
import os
import random
import signal
import sys
from pathlib import Path

import pytest
import ray

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mimo_ray.config_cli import load_config  # noqa: E402
from mimo_ray.driver.ledger import SampleLedger  # noqa: E402
from mimo_ray.driver.train_loop import TrainLoop  # noqa: E402
from mimo_ray.observability import read_metrics  # noqa: E402
from mimo_ray.runtime.disaggregated import DisaggregatedRuntime  # noqa: E402

STEPS = 10


def _cfg(data: Path, out: Path, runtime: str = "disaggregated"):
    return load_config(
        "tiny",
        [
            "--data-path", str(data / "train.jsonl"), "--max-steps", str(STEPS), "--output-dir", str(out),
            "train.ckpt_interval=2", "train.max_failures=8", "train.step_timeout_s=120", "model.lm.seq_length=128",
            f"train.runtime={runtime}",
        ],
    )  # fmt: skip


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]


def _ledger(out: Path) -> list[tuple[int, list[str]]]:
    return [(r["step"], sorted(r["ids"])) for r in SampleLedger(out).read()]


def _ray_processes(part: str) -> list:
    """Processes of this test's Ray node (descendants of its raylet) whose command line holds ``part`` (Ray titles
    its workers ``ray::<task or actor>``). The state API is not used: the session Ray has no dashboard, and other
    Ray instances may run on the host.
    """
    import psutil
    from ray._private import worker

    raylet = worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if part in title:
            found.append((proc.pid, title))
    return found


def _kill_stage(group: str) -> str:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
    victim = sorted(n for n in names if n.startswith(f"mimo/{group}") and "/0.g" in n)[-1]
    ray.kill(ray.get_actor(victim), no_restart=True)
    return victim


def _kill_process(part: str, what: str) -> str:
    procs = _ray_processes(part)
    assert procs, f"no {what} process ({part!r}) alive: {[t for _, t in _ray_processes('ray::')]}"
    pid, title = procs[0]
    os.kill(pid, signal.SIGKILL)
    return f"{title} (pid {pid})"


@pytest.fixture(scope="module")
def clips(tmp_path_factory, ray_local, synthetic_module):
    root = tmp_path_factory.mktemp("chaos")
    synthetic_module.make_synthetic(root / "data", 40, seconds=1.0, fps=8, size=(32, 32), seed=5, val_fraction=0.0)
    return root


def test_chaos_run_ends_on_the_straight_loss_with_the_same_samples(clips, monkeypatch):
    # The uninterrupted run is fused: the same driver, data plan and weights, and equal to a disaggregated run
    # (C3, tests/exactness; test_train_job end to end), without starting a second set of actors.
    straight = clips / "straight"
    with TrainLoop.build(_cfg(clips / "data", straight, "fused")) as loop:
        ref = loop.run()
    assert ref["steps"] == STEPS and not ref["failures"]

    rng = random.Random(11)
    steps = sorted(rng.sample(range(1, STEPS), 4))
    plan = dict(zip(steps, rng.sample(["encoder", "lm", "collate", "decode"], 4), strict=True))
    torn_at = 4  # the checkpoint of step 4 is torn half-way: the encoder ranks wrote, then an LM rank died
    kills: list[str] = []
    fired: set = set()

    def hook(step: int) -> str | None:
        what = plan.get(step)
        if what is None or what in fired:
            return None
        fired.add(what)
        if what in ("encoder", "lm"):
            kills.append(f"{what}: {_kill_stage(what)} at step {step}")
        elif what == "collate":
            kills.append(f"collate: {_kill_process('_CollateFn', 'collate actor')} at step {step}")
        else:
            # The decode worker: the long-lived child that decodes for a Ray Data task worker (data/isolation.py).
            kills.append(f"decode: {_kill_process('mimo_ray.data.isolation', 'decode worker')} at step {step}")
        return kills[-1]  # the driver lists it in the summary

    save = DisaggregatedRuntime.save_checkpoint
    torn = []

    def torn_save(self, path):
        if not torn and Path(path).name.startswith(f".tmp-step_{torn_at:07d}"):
            torn.append(path)
            ray.get([a.save.remote(str(path)) for g in self.encoder_groups for a in g.actors], timeout=120)
            ray.kill(self.lm_group.actors[0], no_restart=True)
            kills.append(f"checkpoint save of step {torn_at} torn after the encoder ranks wrote")
            loops[0].record_faults(kills[-1])
        return save(self, path)

    monkeypatch.setattr(DisaggregatedRuntime, "save_checkpoint", torn_save)
    chaos = clips / "chaos"
    loops = []
    with TrainLoop.build(_cfg(clips / "data", chaos), on_step_start=hook) as loop:
        loops.append(loop)
        summary = loop.run()
    print(json.dumps({"kills": kills, "failures": summary["failures"], "recoveries": summary.get("recoveries")}))

    assert len(kills) == 5, kills
    # Every kill is listed in the summary with the step it hit, whether or not it cost a recovery.
    assert [f["fault"] for f in summary["injected_faults"]] == kills
    assert sorted(f["step"] for f in summary["injected_faults"] if "torn" not in f["fault"]) == steps
    assert summary["steps"] == STEPS
    # Every failure the driver saw is in the summary, the torn save among them; kills that Ray absorbed by itself
    # (a restarted collate actor, a retried decode task) cost no recovery and must not change anything below.
    assert any("checkpoint save after step 4" in f for f in summary["failures"]), summary["failures"]
    assert len(summary["failures"]) >= 3 and len(summary["failures"]) == len(summary["recoveries"])
    losses, ref_losses = _losses(chaos), _losses(straight)
    assert len(losses) == STEPS
    assert abs(losses[-1] - ref_losses[-1]) <= 1e-5 * abs(ref_losses[-1])
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=0)
    ledger = _ledger(chaos)
    assert ledger == _ledger(straight)  # per step the same ids: none consumed twice, none skipped
    ids = [i for _, step_ids in ledger for i in step_ids]
    assert len(ids) == STEPS * 8
    assert not list((chaos / "checkpoints").glob(".tmp-*"))  # the torn save was cleaned up at the restart
