"""A stage checkpoint written by a transformer-engine-layout model (norms fused into linear_qkv / linear_fc1, another
parameter order) resumes in a local-layout model: weights, AdamW moments and bf16 master weights by parameter name."""

from __future__ import annotations

import torch

from mimo_ray.config_cli import load_config
from mimo_ray.model.inputs import random_batch
from mimo_ray.parallel import layer_layout as ll
from mimo_ray.stages import FusedStage


def _step(stage, cfg, seed):
    stats = [stage.forward_backward(random_batch(cfg, 2, seed=seed))]
    stage.optimizer_step(1e-3, 1.0, stage.reduce_grads(*stats))


def _as_te_checkpoint(saved: dict) -> dict:
    """What a TE model would have written: TE names, its parameters in another order (here: reversed)."""
    optim = saved["optimizer"]
    names = [ll.rename(n, ll.TE) for n in optim["param_names"]]
    order = list(reversed(range(len(names))))  # new index j holds old parameter order[j]
    te_optim = {**optim, "param_names": [names[i] for i in order],
                "state": {j: optim["state"][i] for j, i in enumerate(order) if i in optim["state"]},
                "master_weights": {j: optim["master_weights"][i] for j, i in enumerate(order)}}
    return {"model": ll.to_layout(saved["model"], ll.TE), "optimizer": te_optim}


def test_te_layout_stage_checkpoint_resumes_in_local_model(megatron_world, tmp_path):
    cfg = load_config("tiny", ["model.modalities=[]", "model.params_dtype=bf16", "model.lm.seq_length=32"])
    stage = FusedStage(cfg)
    stage.setup()
    _step(stage, cfg, 1)
    stage.save(str(tmp_path / "a"))
    saved = torch.load(tmp_path / "a" / "fused" / "tp0.pt", weights_only=True)
    te = _as_te_checkpoint(saved)
    assert ll.layout_of(te["model"]) == ll.TE
    (tmp_path / "b" / "fused").mkdir(parents=True)
    torch.save(te, tmp_path / "b" / "fused" / "tp0.pt")

    params = {n: p.detach().clone() for n, p in stage.module.named_parameters()}
    ref = saved["optimizer"]  # (optimizer.state_dict() holds references the next step updates in place)
    _step(stage, cfg, 2)
    stage.load(str(tmp_path / "b"))
    for name, p in stage.module.named_parameters():
        assert torch.equal(p, params[name]), name
    got = stage.optimizer.state_dict()
    for i in ref["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(got["state"][i][key], ref["state"][i][key]), (i, key)
    assert all(torch.equal(got["master_weights"][i], v) for i, v in ref["master_weights"].items())
