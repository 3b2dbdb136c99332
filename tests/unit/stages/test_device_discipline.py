"""Device discipline: every tensor the stages hand to torch.distributed or to a transport lives on the stage's device
with the expected dtype (bf16 run: embeddings and their gradients in bf16, DP gradient sums in fp32, the has_grad
agreement in int32). Two real processes form a gloo world of 2 (LM TP=2, then encoder DP=2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from mimo_ray.parallel.megatron_setup import free_port

ROOT = Path(__file__).resolve().parents[3]
PROBE = Path(__file__).with_name("collective_probe.py")


def test_collectives_and_payloads_use_the_stage_device_and_dtype():
    ports = [str(free_port()), str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, str(PROBE), str(r), *ports], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)  # fmt: skip
        for r in (0, 1)
    ]
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        finally:
            proc.kill()
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    records = [r for res in results for r in res["records"]]
    wrong_device = [r for r in records if r["device"] != r["want_device"]]
    assert not wrong_device, wrong_device[:5]
    coll = [r for r in records if r["kind"] == "collective"]
    pay = [r for r in records if r["kind"] == "payload"]

    def dtypes(phase: str, kind: list[dict], fn: str | None = None) -> set[str]:
        return {r["dtype"] for r in kind if r["phase"] == phase and (fn is None or r["fn"] == fn)}

    # LM TP=2: Megatron's tensor-parallel activations in bf16; TP gathers of fp32 main grads and bf16 weights.
    assert "torch.bfloat16" in dtypes("lm_tp2", coll, "all_reduce")
    assert dtypes("lm_tp2", coll) <= {"torch.bfloat16", "torch.float32", "torch.int64"}
    assert dtypes("lm_tp2", coll, "all_gather") == {"torch.float32", "torch.bfloat16"}
    # Encoder DP=2: has_grad in int32, then one flat fp32 sum of the main gradients (never a bf16 sum).
    dp = [r for r in coll if r["phase"] == "encoder_dp2" and r["fn"] == "all_reduce"]
    assert [r["dtype"] for r in dp] == ["torch.int32", "torch.float32"] * 2  # both ranks
    assert all(r["numel"] == dp[0]["numel"] for r in dp if r["dtype"] == "torch.int32")
    # What crosses the encoder/LM boundary is bf16: embedding rows and their gradients.
    assert dtypes("lm_tp2", pay) == {"torch.bfloat16"} and dtypes("encoder_dp2", pay) == {"torch.bfloat16"}
    assert {r["fn"] for r in pay} == {"lm_grad_pieces", "encoder_emb_pieces"}
