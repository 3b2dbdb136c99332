"""Run by test_device_discipline.py as rank 0 and rank 1 of a gloo world of 2 (two processes): records every
torch.distributed collective the stages make and every tensor they hand to a transport, then prints one JSON line.

Phase 1, LM TP=2 (bf16): ``forward_backward`` on bf16 embedding rows, ``reduce_grads``, ``optimizer_step``,
``full_grads`` (TP all-gather). Phase 2, encoder DP=2 (bf16): ``forward_step`` + ``backward_step`` where only rank 0
has audio (so the ``has_grad`` agreement runs), ``reduce_grads``, ``optimizer_step``.
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import torch.distributed as dist

RECORDS: list[dict] = []
CURRENT = {"phase": "setup", "device": "cpu"}
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast", "reduce",
    "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter",
)  # fmt: skip


def _tensors(value) -> list[torch.Tensor]:  # noqa: ANN001
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def _wrap(name: str):  # noqa: ANN202
    original = getattr(dist, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        for t in _tensors(list(args) + [v for k, v in kwargs.items() if k != "group"]):
            RECORDS.append({"kind": "collective", "fn": name, "phase": CURRENT["phase"], "device": str(t.device),
                            "want_device": CURRENT["device"], "dtype": str(t.dtype), "numel": t.numel()})  # fmt: skip
        return original(*args, **kwargs)

    setattr(dist, name, wrapper)


def record_payload(tree, what: str) -> None:  # noqa: ANN001
    for t in _tensors(tree):
        RECORDS.append({"kind": "payload", "fn": what, "phase": CURRENT["phase"], "device": str(t.device),
                        "want_device": CURRENT["device"], "dtype": str(t.dtype), "numel": t.numel()})  # fmt: skip


def main(rank: int, port_lm: int, port_enc: int) -> None:
    # Before Megatron is imported: it keeps references such as all_gather_into_tensor at import time.
    for name in COLLECTIVES:
        if hasattr(dist, name):
            _wrap(name)
    from mimo_ray.config_cli import load_config
    from mimo_ray.model.inputs import random_batch
    from mimo_ray.model.spec import tokens_per_sample
    from mimo_ray.stages.encoder import EncoderStage
    from mimo_ray.stages.language import LanguageStage
    from mimo_ray.stages.payload import TOKEN_KEYS

    torch.set_num_threads(1)
    base = ["model.params_dtype=bf16", "data.micro_batch_size=2", "data.global_batch_size=4", "model.lm.seq_length=96"]

    CURRENT["phase"] = "lm_tp2"
    cfg = load_config("tiny", [*base, "parallel.lm_tp=2"])
    lm = LanguageStage(cfg, rank=rank, world_size=2)
    lm.setup(init_method=f"tcp://127.0.0.1:{port_lm}", payload_format="torch")
    CURRENT["device"] = str(lm.device)
    batch = random_batch(cfg, 2, seed=3)
    gen = torch.Generator().manual_seed(5)
    rows = {m: 2 * tokens_per_sample(cfg, m) for m in cfg.model.modalities}
    emb = {m: torch.randn(n, 64, generator=gen).to(torch.bfloat16) for m, n in rows.items()}
    payload = {"tokens": {k: batch[k] for k in TOKEN_KEYS}, "emb": emb}
    out = lm.forward_backward(0, 1, payload, return_grads=rank == 0)
    if rank == 0:
        record_payload(out[1:], "lm_grad_pieces")
    sq = lm.reduce_grads(out[0] if rank == 0 else {"num_tokens": float(batch["loss_mask"].sum())})
    lm.optimizer_step(1e-3, 1.0, sq, sq)
    lm.full_grads()
    lm.full_parameters()

    CURRENT["phase"] = "encoder_dp2"
    cfg = load_config("tiny", base)
    enc = EncoderStage(cfg, list(cfg.model.modalities), rank=rank, world_size=2)
    enc.setup(init_method=f"tcp://127.0.0.1:{port_enc}", payload_format="torch")
    CURRENT["device"] = str(enc.device)
    batch = random_batch(cfg, 2, seed=10 + rank)
    if rank == 1:  # no audio on this rank: its audio encoder has no gradient, rank 0's has
        batch = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["input_ids"] == 262, 7)}
        batch["modality_inputs"] = {"video": batch["modality_inputs"]["video"]}
    pieces = enc.forward_step(0, batch, [(0, 2)])
    record_payload([p["emb"] for p in pieces], "encoder_emb_pieces")
    grads = {m: torch.ones_like(t) for m, t in pieces[0]["emb"].items()}
    enc.backward_step(0, grads)
    sq = enc.reduce_grads({"num_tokens": 10.0})
    enc.optimizer_step(1e-3, 1.0, sq, sq)
    print(json.dumps({"rank": rank, "records": RECORDS}))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
