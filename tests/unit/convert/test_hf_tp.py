"""An LM imported for parallel.lm_tp=2 (every rank its own slice, SwiGLU fc1 with stride 2, padded vocabulary)
gives the TP=1 results over gloo: gathered parameters equal the HF tensors, losses equal the fused model's."""

from __future__ import annotations

import pytest
import torch

from mimo_ray.convert.importer import import_run
from mimo_ray.model.inputs import random_batch
from mimo_ray.parallel.imported_layout import part_file
from mimo_ray.runtime import build_runtime

transformers = pytest.importorskip("transformers")


def test_tp2_import_matches_tp1(hf_dirs, tmp_path, ray_local, megatron_world, record_property):
    over = ["model.modalities=[images]", "parallel.lm_tp=2", "model.lm.make_vocab_size_divisible_by=5",
            "model.lm.seq_length=32", "data.micro_batch_size=2", "data.global_batch_size=4"]
    cfg, step = import_run(str(hf_dirs["llama"]), None, None, str(tmp_path / "run"), "tiny", over)
    shards = [torch.load(part_file(step, "language_model", r), weights_only=True) for r in range(2)]
    fc1 = "language_model.decoder.layers.0.mlp.linear_fc1.weight"
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"])
    gate, up = hf.model.layers[0].mlp.gate_proj.weight, hf.model.layers[0].mlp.up_proj.weight
    for r in range(2):  # rank r holds [gate_r; up_r] (stride 2), not a plain half of cat([gate; up])
        assert torch.equal(shards[r][fc1], torch.cat([gate[32 * r : 32 * (r + 1)], up[32 * r : 32 * (r + 1)]]))
    assert shards[0]["language_model.embedding.word_embeddings.weight"].shape == (25, 32)

    fused = build_runtime(load(cfg, "fused"))
    fused.load_checkpoint(str(step))
    with build_runtime(load(cfg, "disaggregated")) as dis:
        dis.load_checkpoint(str(step))
        full_d, full_f = dis.named_parameters_full(), fused.named_parameters_full()
        assert set(full_d) == set(full_f)
        for key in full_f:
            assert torch.equal(full_d[key], full_f[key]), key
        assert torch.equal(full_f[f"language_model.{fc1[len('language_model.'):]}"], torch.cat([gate, up]))
        mbs = [random_batch(cfg, 2, seed=7 + i) for i in range(2)]
        got, ref = dis.eval_step(mbs)["loss"], fused.eval_step(mbs)["loss"]
    fused.close()
    record_property("tp2_loss_rel", abs(got - ref) / abs(ref))
    assert abs(got - ref) <= 1e-6 * abs(ref)


def load(cfg, runtime):
    import dataclasses

    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, runtime=runtime))
