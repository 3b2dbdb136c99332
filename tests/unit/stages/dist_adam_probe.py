"""Run by test_distributed_optimizer.py as rank 0 and rank 1 of a gloo world of 2 (LM DP=2, fp32, two processes):
the same two clipped steps with the torch optimizer and with Megatron's DistributedAdam (behind the test-only
CUDA-name patch of ``test_distributed_optimizer.py``), a save of the DP-sharded optimizer after them, one more step,
and that step again from the checkpoint in a fresh stage. Prints one JSON line.

    python tests/unit/stages/dist_adam_probe.py RANK PORT_A PORT_B PORT_C CKPT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def patch_cuda_names() -> None:
    """DistributedOptimizer's two CUDA assumptions on a CPU torch (see ``cuda_names`` in the test)."""
    real_tensor, real_type = torch.tensor, torch.Tensor.type

    def tensor(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        return real_tensor(*args, **kwargs)

    def type_name(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        out = real_type(self, *args, **kwargs)
        return out.replace("torch.", "torch.cuda.", 1) if not args and not kwargs else out

    torch.tensor = tensor
    torch.Tensor.type = type_name  # type: ignore[method-assign]
    import mimo_ray.stages.base as base

    base.resolve_impl = lambda impl, device: impl


def _gather(value):  # noqa: ANN001, ANN202
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def main(rank: int, ports: list[int], ckpt: str) -> None:
    patch_cuda_names()
    from mimo_ray.config_cli import load_config
    from mimo_ray.model.inputs import random_batch
    from mimo_ray.stages.language import LanguageStage
    from mimo_ray.stages.payload import TOKEN_KEYS

    torch.set_num_threads(1)
    over = ["model.modalities=[]", "model.lm.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4",
            "parallel.lm_dp=2", "train.runtime=fused"]  # fmt: skip

    def stage(impl: str, port: int) -> LanguageStage:
        lm = LanguageStage(load_config("tiny", [*over, f"train.optimizer_impl={impl}"]), rank=rank, world_size=2)
        lm.setup(init_method=f"tcp://127.0.0.1:{port}", payload_format="torch")
        return lm

    def step(lm: LanguageStage, index: int) -> dict:
        batch = random_batch(lm.cfg, 2, seed=100 * index + rank)  # each DP rank its own micro-batch
        out = lm.forward_backward(index, 1, {"tokens": {k: batch[k] for k in TOKEN_KEYS}, "emb": {}})
        share = lm.reduce_grads(*_gather(out[0]))
        res = lm.optimizer_step(1e-3, 0.5, *_gather(share))
        stats = _gather(out[0])
        loss = sum(s["loss_sum"] for s in stats) / sum(s["num_tokens"] for s in stats)
        return {"loss": loss, "norm": res["grad_norm"], "coef": res["clip_coef"], "share": share}

    ref = stage("torch", ports[0])
    torch_steps = [step(ref, i) for i in range(2)]
    ref_params = ref.full_parameters()
    meg = stage("megatron", ports[1])
    meg_steps = [step(meg, i) for i in range(2)]
    meg_params = meg.full_parameters()
    meg.save(ckpt)
    dist.barrier()  # the driver waits for every rank's save before anything reads it
    shard_numel = sum(e - s for _, s, e in meg.optimizer.shards)
    numel = sum(p.numel() for p in meg.module.parameters() if p.requires_grad)
    cont = step(meg, 2)
    fresh = stage("megatron", ports[2])
    fresh.load(ckpt)
    resumed = step(fresh, 2)
    diff = max((float((meg_params[k] - ref_params[k]).abs().max()) for k in ref_params), default=-1.0)
    print(json.dumps({"rank": rank, "torch": torch_steps, "megatron": meg_steps, "cont": cont, "resumed": resumed,
                      "param_diff": diff, "shard_numel": shard_numel, "numel": numel,
                      "files": sorted(p.name for p in (Path(ckpt) / "lm").iterdir())}))


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(p) for p in sys.argv[2:5]], sys.argv[5])
