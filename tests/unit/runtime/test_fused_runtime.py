import math

import pytest
import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch
from mimo_ray.runtime import TrainRuntime, build_runtime


def test_fused_runtime_step_semantics(megatron_world, small_overrides):
    cfg = load_config("tiny", [*small_overrides, "train.runtime=fused", "train.grad_clip=0"])
    rt = build_runtime(cfg)
    assert isinstance(rt, TrainRuntime)
    mbs = [random_batch(cfg, 2, seed=s) for s in range(2)]
    before = rt.named_parameters_full()
    out = rt.train_step(mbs, lr=1e-3)
    assert set(out) == {"loss", "num_tokens", "grad_norm", "step_time_s", "sample_ids"}
    assert out["sample_ids"] == []  # random batches carry no ids
    # The loss is the per-token mean over the whole global batch, not a mean of micro-batch means.
    model = rt.stage.module
    with torch.no_grad():
        sums = []
        for mb in mbs:
            for name, p in model.named_parameters():
                p.copy_(before[name])
            loss, mask = model(
                mb["input_ids"], mb["position_ids"], None, mb["loss_mask"], mb["labels"], mb["modality_inputs"]
            )
            sums.append(((loss * mask).sum().item(), mask.sum().item()))
    assert out["num_tokens"] == sum(n for _, n in sums)
    assert out["loss"] == pytest.approx(sum(s for s, _ in sums) / out["num_tokens"], rel=1e-6)
    grads = rt.grads()
    assert set(grads) == set(before)
    assert out["grad_norm"] == pytest.approx(math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values())))
    # Plain generators work in-process; micro-batch k comes from stream k % len(streams).
    rt.set_data_iterators([(random_batch(cfg, 2, seed=s) for s in (0, 2)), (random_batch(cfg, 2, seed=1),)])
    assert rt.eval_step(None)["num_tokens"] == out["num_tokens"]
    with pytest.raises(ValueError, match="at least one iterator"):
        rt.set_data_iterators([])
    rt.close()
