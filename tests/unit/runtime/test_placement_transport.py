import pytest

from mimo_ray.config import load_config
from mimo_ray.runtime.placement import (
    InsufficientResourcesError,
    group_specs,
    required_resources,
    shortfall,
    wait_for_resources,
)
from mimo_ray.runtime.transport import ActorLocation, choose_transport


def test_group_specs_shared_and_per_modality():
    cfg = load_config(
        "tiny", ["parallel.lm_tp=2", "parallel.lm_dp=2", "parallel.encoder_dp=2", "parallel.lm_resources={lm_node: 1}"]
    )
    specs = group_specs(cfg)
    assert [(s.name, s.num_actors, s.modalities) for s in specs] == [
        ("encoder-shared", 2, ("video", "audio")),
        ("lm", 4, ()),
    ]
    assert specs[1].bundle == {"CPU": 0.25, "lm_node": 1}
    assert required_resources(specs) == {"CPU": 1.5, "lm_node": 4}
    per = group_specs(
        load_config(
            "tiny", ["parallel.encoder_groups=per_modality", "parallel.use_gpu=true", "parallel.gpus_per_actor=0.5"]
        )
    )
    assert [s.name for s in per] == ["encoder-video", "encoder-audio", "lm"]
    assert per[0].bundle == {"CPU": 0.25, "GPU": 0.5}
    assert shortfall({"CPU": 2, "GPU": 1}, {"CPU": 4}) == {"GPU": 1}
    assert group_specs(load_config("tiny", ["parallel.cpus_per_actor=0"]))[0].bundle == {"CPU": 0.001}


def test_resource_check_names_need_and_have(ray_local):
    cfg = load_config("tiny", ["parallel.lm_resources={lm_gpu: 2}", "parallel.lm_tp=2"])
    with pytest.raises(InsufficientResourcesError) as err:
        wait_for_resources(group_specs(cfg), timeout_s=0.2, poll_s=0.1)
    msg = str(err.value)
    assert "needs {CPU: 0.75, lm_gpu: 4}" in msg and "cluster has {CPU: 4, lm_gpu: 0}" in msg
    assert "missing {lm_gpu: 4}" in msg and "lm 2 x {CPU: 0.25, lm_gpu: 2}" in msg


def test_choose_transport():
    cpu = load_config("tiny").parallel
    gpu = load_config("tiny", ["parallel.use_gpu=true"]).parallel
    a0, a1, b0 = ActorLocation("a", ("0",)), ActorLocation("a", ("1",)), ActorLocation("b", ("0",))
    assert choose_transport(cpu, [ActorLocation("a")], [ActorLocation("a")]) == "object_store"
    assert choose_transport(gpu, [a0], [a1]) == "nccl"
    assert choose_transport(gpu, [a0], [b0]) == "nccl"
    assert choose_transport(gpu, [a0], [a0, a0]) == "cuda_ipc"
    forced = load_config("tiny", ["parallel.use_gpu=true", "parallel.transport=object_store"]).parallel
    assert choose_transport(forced, [a0], [a1]) == "object_store"
    ipc = load_config("tiny", ["parallel.use_gpu=true", "parallel.transport=cuda_ipc"]).parallel
    with pytest.raises(ValueError, match="transport='cuda_ipc' needs the encoder, LM and decoder actors on one GPU"):
        choose_transport(ipc, [a0], [a1])
    # The decoder group takes part: on another GPU it turns CUDA IPC into NCCL (or an error when IPC is forced).
    assert choose_transport(gpu, [a0], [a0], [a0]) == "cuda_ipc"
    assert choose_transport(gpu, [a0], [a0], [a1]) == "nccl"
    with pytest.raises(ValueError, match="needs the encoder, LM and decoder actors on one GPU"):
        choose_transport(ipc, [a0], [a0], [a1])
    with pytest.raises(ValueError, match="needs every stage actor on a GPU"):
        choose_transport(ipc, [ActorLocation("a")], [a0])
    with pytest.raises(ValueError, match="parallel.transport='nccl' needs parallel.use_gpu=true"):
        load_config("tiny", ["parallel.transport=nccl"])
