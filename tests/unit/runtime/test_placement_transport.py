import pytest

from mimo_ray.config_cli import load_config
from mimo_ray.runtime.placement import (
    InsufficientResourcesError,
    bundle_of,
    group_specs,
    placement_layout,
    release,
    required_resources,
    reserve,
    shortfall,
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
        reserve(group_specs(cfg), timeout_s=0.2, poll_s=0.1)
    msg = str(err.value)
    assert "needs {CPU: 0.75, lm_gpu: 4}" in msg and "cluster has {CPU: 4, lm_gpu: 0}" in msg
    assert "missing {lm_gpu: 4}" in msg and "lm 2 x {CPU: 0.25, lm_gpu: 2}" in msg
    # The pool at fault, and what one of its nodes must offer (the two TP ranks share a node).
    assert "not placed: lm on lm_gpu (one node with {CPU: 0.5, lm_gpu: 4})" in msg
    assert _live_mimo_placement_groups() == []  # the pending groups (the autoscaler's demand) are gone again


def _live_mimo_placement_groups():
    import ray

    table = ray.util.placement_group_table().values()
    return [t["name"] for t in table if t["name"].startswith("mimo/") and t["state"] != "REMOVED"]


def test_tp_ranks_share_a_node_strict_pack(ray_local):
    cfg = load_config("tiny", ["parallel.lm_tp=2", "parallel.lm_dp=2", "parallel.encoder_dp=2"])
    enc, lm = group_specs(cfg)
    assert (enc.pack_size, lm.pack_size) == (1, 2)
    assert placement_layout(enc) == [([{"CPU": 0.25}] * 2, "PACK")]
    assert placement_layout(lm) == [([{"CPU": 0.25}] * 2, "STRICT_PACK")] * 2
    # Megatron's TP groups are consecutive ranks: ranks 0,1 → group 0; ranks 2,3 → group 1.
    assert [bundle_of(lm, r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [bundle_of(enc, r) for r in range(2)] == [(0, 0), (0, 1)]
    import ray

    pgs = reserve([enc, lm], timeout_s=60, generation=77)
    try:
        table = ray.util.placement_group_table()
        got = {table[pg.id.hex()]["name"]: table[pg.id.hex()]["strategy"] for g in pgs.values() for pg in g}
        assert got == {
            "mimo/encoder-shared.g77": "PACK",
            "mimo/lm.g77/0": "STRICT_PACK",
            "mimo/lm.g77/1": "STRICT_PACK",
        }
        assert all(table[pg.id.hex()]["state"] == "CREATED" for g in pgs.values() for pg in g)
    finally:
        release(pgs)
    assert _live_mimo_placement_groups() == []


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


def test_transport_preflight_rejects_impossible_gpu_layouts_before_any_actor(monkeypatch):
    import mimo_ray.runtime.transport as transport
    from mimo_ray.runtime.disaggregated import DisaggregatedRuntime

    gpu = ["parallel.use_gpu=true"]
    ipc = [*gpu, "parallel.transport=cuda_ipc", "parallel.gpus_per_actor=0.5"]
    check = transport.check_transport_config
    check(load_config("tiny", ipc))  # 1 encoder + 1 LM actor at 0.5 GPU each: fits on one GPU
    with pytest.raises(ValueError, match=r"parallel.lm_dp and parallel.lm_tp must be 1 \(got 1, 1, 2\)"):
        DisaggregatedRuntime(load_config("tiny", [*ipc, "parallel.lm_tp=2"]))  # raises before Ray is even asked
    with pytest.raises(ValueError, match=r"parallel.gpus_per_actor x 3 actors must be <= 1 \(got 0.5\)"):
        check(load_config("tiny", [*ipc, "parallel.decoder_placement=group", "model.outputs.image_out.enabled=true"]))
    with pytest.raises(ValueError, match=r"gpus_per_actor x 2 actors must be <= 1 \(got 1.0\)"):
        check(load_config("tiny", [*gpu, "parallel.transport=cuda_ipc"]))
    monkeypatch.setattr(transport, "cupy_available", lambda: False)
    with pytest.raises(ValueError, match=r"transport='nccl' uses NCCL .* needs cupy: pip install -e '.\[gpu\]'"):
        check(load_config("tiny", [*gpu, "parallel.transport=nccl"]))
    with pytest.raises(ValueError, match=r"parallel.transport='auto' uses NCCL"):  # separate GPUs → auto means NCCL
        check(load_config("tiny", gpu))
    check(load_config("tiny", [*gpu, "parallel.gpus_per_actor=0.5"]))  # auto on one shared GPU → CUDA IPC
    check(load_config("tiny", [*gpu, "parallel.transport=object_store"]))
    monkeypatch.setattr(transport, "cupy_available", lambda: True)
    check(load_config("tiny", [*gpu, "parallel.transport=nccl"]))


def test_close_kills_actors_before_a_bounded_communicator_destroy(monkeypatch):
    import threading

    import ray.experimental.collective as collective

    from mimo_ray.runtime.disaggregated import DisaggregatedRuntime
    from mimo_ray.runtime.transport import DirectTransport

    events: list[str] = []
    stuck = threading.Event()

    def destroy_forever(group):  # a member wedged in NCCL never answers Ray's destroy
        events.append(f"destroy {group}")
        stuck.wait(60)

    monkeypatch.setattr(collective, "destroy_collective_group", destroy_forever)

    class Group:
        def __init__(self, name):
            self.name = name

        def kill(self):
            events.append(f"kill {self.name}")

    transport = DirectTransport("nccl")
    transport._group, transport.group_name = "g1", "mimo-rdt-nccl-test"
    rt = object.__new__(DisaggregatedRuntime)
    rt.encoder_groups, rt.lm_group, rt.decoder_group = [Group("enc")], Group("lm"), Group("dec")
    rt.transport = transport
    rt.close(destroy_timeout_s=0.2)  # returns although the destroy never does
    stuck.set()
    assert events[:3] == ["kill enc", "kill lm", "kill dec"] and events[3] == "destroy g1"
    assert rt.transport is None and rt.groups == []
    rt.close()  # idempotent


def test_collective_group_names_are_unique(monkeypatch):
    import ray.experimental.collective as collective

    from mimo_ray.runtime.transport import DirectTransport

    monkeypatch.setattr(collective, "create_collective_group", lambda actors, backend, name: name)
    names = set()
    for _ in range(3):
        t = DirectTransport("nccl")
        t.setup([])
        names.add(t.group_name)
    assert len(names) == 3 and all(n.startswith("mimo-rdt-nccl-") for n in names)
