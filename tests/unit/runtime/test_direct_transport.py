"""Ray Direct Transport plumbing (stash → take over RDT → consumer), over gloo between two light CPU actors.

The stage actors use NCCL / CUDA IPC on GPUs; gloo RDT cannot live beside Megatron's groups (NOTES §3), so the
actors here are Megatron-free stages.
"""

import sys

import pytest
import ray
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.runtime.stage_actor import actor_class
from mimo_ray.runtime.transport import DirectTransport
from mimo_ray.stages.base import Stage, stage_call


class Producer(Stage):
    @stage_call
    def make(self, num: int, fail: bool = False):
        if fail:
            raise ValueError("bad batch")
        return [{"emb": {"video": torch.full((3, 2), float(i))}} for i in range(num)] + [{"num": num}]


class Consumer(Stage):
    @stage_call
    def use(self, *payloads):
        return [sum(float(p["emb"]["video"].sum()) for p in payloads)]


def test_direct_transport_moves_tensor_payloads_actor_to_actor(ray_local):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # test classes are not importable by workers
    cfg = load_config("tiny")

    def actor(cls, role):
        remote = ray.remote(enable_tensor_transport=True)(actor_class(cls)).options(num_cpus=0.25)
        return remote.remote(cfg, role=role, rank=0, world_size=1)

    producer, consumer = actor(Producer, "producer"), actor(Consumer, "consumer")
    transport = DirectTransport("gloo")
    try:
        transport.setup([producer, consumer])
        refs = transport.call(producer, "make", (3,), num_outputs=4, direct=range(3))
        total = transport.call(consumer, "use", refs[:3], num_outputs=1)[0]
        assert ray.get([total, refs[3]], timeout=60) == [18.0, {"num": 3}]
        bad = transport.call(producer, "make", (1,), num_outputs=2, direct=range(1), kwargs={"fail": True})
        with pytest.raises(ValueError, match=r"\[producer/0\] ValueError: bad batch"):
            ray.get(transport.call(consumer, "use", bad[:1], num_outputs=1)[0], timeout=60)
    finally:
        transport.teardown()
        for a in (producer, consumer):
            ray.kill(a)
