"""Run by test_distributed_optimizer.py as rank 0 and rank 1 of a gloo world of 2 (LM DP=2, fp32, two processes):
the same two clipped steps with the torch optimizer and with Megatron's DistributedAdam (behind the test-only
CUDA-name patch of ``test_distributed_optimizer.py``), a save of the DP-sharded optimizer after them, one more step,
and that step again from the checkpoint in a fresh stage; then LM TP=2 (DP=1) and an encoder group at DP=2, each
with both optimizers. Prints one JSON line.

    python tests/unit/stages/dist_adam_probe.py RANK CKPT_DIR PORT...   (7 free ports)
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

    def stage(impl: str, port: int, extra: tuple[str, ...] = ()) -> LanguageStage:
        cfg = load_config("tiny", [*over, *extra, f"train.optimizer_impl={impl}"])
        lm = LanguageStage(cfg, rank=rank, world_size=2)
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
    diff = _max_diff(meg_params, ref_params)
    out = {"rank": rank, "torch": torch_steps, "megatron": meg_steps, "cont": cont, "resumed": resumed,
           "param_diff": diff, "shard_numel": shard_numel, "numel": numel,
           "files": sorted(p.name for p in (Path(ckpt) / "lm").iterdir())}
    out["tp2"] = {}
    for impl, port in (("torch", ports[3]), ("megatron", ports[4])):
        lm = stage(impl, port, ("parallel.lm_tp=2", "parallel.lm_dp=1", "data.global_batch_size=2"))
        batch = random_batch(lm.cfg, 2, seed=7)  # TP ranks see the same micro-batch
        res = lm.forward_backward(0, 1, {"tokens": {k: batch[k] for k in TOKEN_KEYS}, "emb": {}})
        stats = _gather(res[0])[0]
        share = lm.reduce_grads(stats)
        step_out = lm.optimizer_step(1e-3, 0.5, *_gather(share))
        out["tp2"][impl] = {"norm": step_out["grad_norm"], "share": share, "params": lm.full_parameters()}
    tp = out["tp2"]
    out["tp2"] = {impl: {"norm": v["norm"], "share": v["share"]} for impl, v in tp.items()}
    out["tp2"]["param_diff"] = _max_diff(tp["megatron"]["params"], tp["torch"]["params"])
    out["encoder_dp2"] = _encoder_dp2(rank, ports[5:7])
    print(json.dumps(out))


def _max_diff(a: dict, b: dict) -> float:
    return max((float((a[k] - b[k]).abs().max()) for k in b), default=-1.0)


def _encoder_dp2(rank: int, ports: list[int]) -> dict:
    """One step of an encoder group (video + audio) at DP=2 with each optimizer, on gradients of ones."""
    from mimo_ray.config_cli import load_config
    from mimo_ray.model.inputs import random_batch
    from mimo_ray.stages.encoder import EncoderStage

    out = {}
    for impl, port in zip(("torch", "megatron"), ports, strict=True):
        cfg = load_config("tiny", ["data.micro_batch_size=2", "data.global_batch_size=4", "model.lm.seq_length=96",
                                   "train.runtime=fused", f"train.optimizer_impl={impl}"])
        enc = EncoderStage(cfg, list(cfg.model.modalities), rank=rank, world_size=2)
        enc.setup(init_method=f"tcp://127.0.0.1:{port}", payload_format="torch")
        pieces = enc.forward_step(0, random_batch(cfg, 2, seed=10 + rank), [(0, 2)])
        enc.backward_step(0, {m: torch.ones_like(t) for m, t in pieces[0]["emb"].items()})
        share = enc.reduce_grads({"num_tokens": 10.0})
        res = enc.optimizer_step(1e-3, 0.5, *_gather(share))
        out[impl] = {"norm": res["grad_norm"], "share": share, "params": enc.full_parameters(),
                     "kind": type(enc.optimizer).__name__}
    diff = _max_diff(out["megatron"]["params"], out["torch"]["params"])
    return {**{impl: {k: v for k, v in r.items() if k != "params"} for impl, r in out.items()}, "param_diff": diff}


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(p) for p in sys.argv[3:]], sys.argv[2])
