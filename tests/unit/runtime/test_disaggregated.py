"""Lifecycle of the disaggregated runtime on local Ray: names, data streams, checkpoints, failures, teardown."""

import time

import pytest
import ray
import torch
from tolerances import LOSS_RTOL, params_ratio

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch
from mimo_ray.runtime import InsufficientResourcesError, build_runtime
from mimo_ray.stages import ListStream
from mimo_ray.stages.streams import random_streams


@pytest.fixture(scope="module")
def runtimes(ray_local, megatron_world, small_cfg, small_overrides):
    fused = build_runtime(load_config("tiny", [*small_overrides, "train.runtime=fused"]))
    dis = build_runtime(small_cfg)
    yield fused, dis
    dis.close()
    fused.close()


def _same_result(a, b):
    """Loss and grad norm within C3's tolerance (two processes: the last bits may differ by CPU model)."""
    return a["num_tokens"] == b["num_tokens"] and [a["loss"], a["grad_norm"]] == pytest.approx(
        [b["loss"], b["grad_norm"]], rel=LOSS_RTOL
    )


def _same_params(a, b, steps):
    """Parameters within the AdamW absolute-plus-relative bound after ``steps`` steps at lr 1e-3."""
    return params_ratio(a.named_parameters_full(), b.named_parameters_full(), lr=1e-3, steps=steps) <= 1


def test_actors_are_named_and_placed(runtimes):
    _, dis = runtimes
    gen = dis.generation
    for name in (f"mimo/encoder-shared/0.g{gen}", f"mimo/lm/0.g{gen}"):
        assert ray.get_actor(name) is not None
    assert dis.transport.name == "object_store"
    table = ray.util.placement_group_table()
    names = {v["name"] for v in table.values() if v["state"] == "CREATED"}
    assert {f"mimo/encoder-shared.g{gen}", f"mimo/lm.g{gen}"} <= names


def test_streams_pulled_by_encoder_actors_match_fused(runtimes, small_cfg):
    fused, dis = runtimes
    batches = [random_batch(small_cfg, 2, seed=70 + i) for i in range(4)]
    fused.set_data_iterators([iter(batches)])  # the fused runtime takes plain generators too
    dis.set_data_iterators([ListStream(batches)])
    for _ in range(2):
        a, b = fused.train_step(None, 1e-3), dis.train_step(None, 1e-3)
        assert _same_result(a, b)
    assert _same_params(fused, dis, steps=2)
    with pytest.raises(RuntimeError, match=r"\[encoder-shared/0\].*exhausted"):
        dis.train_step(None, 1e-3)
    with pytest.raises(TypeError, match="generator object"):
        dis.set_data_iterators([(b for b in batches)])
    with pytest.raises(ValueError, match="parallel.encoder_dp=1"):
        dis.set_data_iterators([batches, batches])
    dis.set_data_iterators(random_streams(dis.cfg))  # back to the default random streams
    fused.set_data_iterators([iter([])])


def test_checkpoint_resume_is_exact(runtimes, microbatches, tmp_path):
    fused, dis = runtimes
    dis.save_checkpoint(str(tmp_path / "dis"))
    fused.save_checkpoint(str(tmp_path / "fused"))
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt"))
    assert files == ["dis/encoder-shared/tp0.pt", "dis/lm/tp0.pt", "fused/fused/tp0.pt"]
    for file in tmp_path.rglob("*.pt"):
        assert set(torch.load(file, weights_only=True)) == {"model", "optimizer"}
    first = dis.train_step(microbatches, 1e-3)
    dis.load_checkpoint(str(tmp_path / "dis"))
    again = dis.train_step(microbatches, 1e-3)
    # Same process, same kernels, same order: the resumed step repeats the first one bit for bit.
    assert again["loss"] == first["loss"] and again["grad_norm"] == first["grad_norm"]
    fused.load_checkpoint(str(tmp_path / "fused"))
    ref = fused.train_step(microbatches, 1e-3)
    assert _same_result(again, ref)
    assert _same_params(fused, dis, steps=3)


def test_bad_batch_raises_with_stage_and_rank_then_recovers(runtimes, microbatches):
    fused, dis = runtimes
    bad = [dict(mb) for mb in microbatches]
    bad[1]["input_ids"] = bad[1]["input_ids"].clone()
    bad[1]["input_ids"][0, -1] = 261  # one video placeholder too many
    with pytest.raises(ValueError, match=r"\[encoder-shared/0\].*'video': 33 placeholder tokens in input_ids but 32"):
        dis.train_step(bad, 1e-3)
    a, b = fused.train_step(microbatches, 1e-3), dis.train_step(microbatches, 1e-3)  # partial step was dropped
    assert _same_result(a, b)
    assert dis.eval_step(microbatches)["loss"] == pytest.approx(fused.eval_step(microbatches)["loss"], rel=LOSS_RTOL)


def test_step_timeout_raises(runtimes, microbatches):
    _, dis = runtimes
    dis.timeout_s = 1e-4
    try:
        with pytest.raises(ray.exceptions.GetTimeoutError):
            dis.train_step(microbatches, 1e-3)
    finally:
        dis.timeout_s = 300.0
    ray.get([a.reset_step.remote() for a in dis.all_actors], timeout=60)


def test_dead_tp_peer_surfaces_fast_and_close_cleans_up(ray_local, megatron_world, small_overrides, microbatches):
    dis = build_runtime(load_config("tiny", [*small_overrides, "parallel.lm_tp=2"]))
    gen = dis.generation
    ray.kill(dis.lm_group.actors[1], no_restart=True)  # TP rank 0 is left alone in its collectives
    start = time.monotonic()
    with pytest.raises(ray.exceptions.RayError):
        dis.train_step(microbatches, 1e-3)
    assert time.monotonic() - start < 60
    dis.close()
    dis.close()  # idempotent
    for name in (f"mimo/encoder-shared/0.g{gen}", f"mimo/lm/0.g{gen}", f"mimo/lm/1.g{gen}"):
        with pytest.raises(ValueError):
            ray.get_actor(name)
    states = {v["name"]: v["state"] for v in ray.util.placement_group_table().values()}
    assert states[f"mimo/lm.g{gen}"] == states[f"mimo/encoder-shared.g{gen}"] == "REMOVED"


def test_impossible_placement_fails_before_any_actor(ray_local, small_overrides):
    cfg = load_config(
        "tiny", [*small_overrides, "parallel.lm_resources={lm_gpu: 1}", "parallel.placement_timeout_s=0.5"]
    )
    before = len(ray.util.list_named_actors())
    groups_before = _live_groups()
    with pytest.raises(InsufficientResourcesError, match=r"needs \{CPU: 0.5, lm_gpu: 1\} for .* cluster has \{CPU: "):
        build_runtime(cfg)
    assert len(ray.util.list_named_actors()) == before
    # The pending placement groups (an autoscaler's demand while waiting) were removed on failure.
    assert _live_groups() == groups_before


def _live_groups():
    table = ray.util.placement_group_table().values()
    return sorted(t["name"] for t in table if t["name"].startswith("mimo/") and t["state"] != "REMOVED")
