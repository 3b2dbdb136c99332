"""The HF LM mapping in the transformer-engine layer layout: the importer writes exactly the parameter names Megatron's
TE GPT layer spec creates (read off the spec on CPU, without transformer-engine), the export of a TE-layout
checkpoint gives back the HF tensors bit for bit, and checkpoints load across the two layouts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from spec_names import spec_param_names, te_spec_without_te

from mimo_ray.convert.exporter import export_lm, export_run, full_state
from mimo_ray.convert.importer import import_run
from mimo_ray.convert.mapping import lm_rules
from mimo_ray.model import build_lm_part
from mimo_ray.model.layers import layer_spec, te_layer_spec
from mimo_ray.model.spec import language_model_spec
from mimo_ray.parallel import layer_layout as ll
from mimo_ray.parallel.imported_layout import load_imported, part_file, read_manifest

pytest.importorskip("transformers")

OVER = ["model.modalities=[]", "model.lm.seq_length=32"]


def _expected_lm_names(cfg, te: bool) -> set[str]:
    """Every LM parameter name: the layer names the spec creates, per layer, plus embedding, final norm, head."""
    spec = language_model_spec(cfg.model)
    if te:
        with te_spec_without_te():
            layer = te_layer_spec(causal=True)
    else:
        layer = layer_spec(cfg.model.attention_backend, causal=True)
    names = spec_param_names(layer, spec.params["config"])
    lm = cfg.model.lm
    out = {f"language_model.decoder.layers.{i}.{n}" for i in range(lm.num_layers) for n in names}
    out |= {"language_model.embedding.word_embeddings.weight", "language_model.decoder.final_layernorm.weight"}
    if lm.untie_embeddings_and_output_weights:
        out.add("language_model.output_layer.weight")
    return out


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_te_import_writes_exactly_the_te_spec_names(hf_dirs, tmp_path, name):
    cfg, step = import_run(str(hf_dirs[name]), None, None, str(tmp_path / "te"), "tiny", OVER, lm_layout="te")
    te_keys = set(torch.load(part_file(step, "language_model", 0), weights_only=True))
    assert te_keys == _expected_lm_names(cfg, te=True)
    assert {r.ours for r in lm_rules(cfg.model, "model.", 48, "te")} == te_keys
    assert read_manifest(step)["lm_layout"] == "te"
    assert any(k.endswith("linear_qkv.bias") for k in te_keys) == (name == "qwen2")  # Qwen2's q/k/v biases

    _, local_step = import_run(str(hf_dirs[name]), None, None, str(tmp_path / "local"), "tiny", OVER)
    local = torch.load(part_file(local_step, "language_model", 0), weights_only=True)
    assert set(local) == _expected_lm_names(cfg, te=False)
    te = torch.load(part_file(step, "language_model", 0), weights_only=True)
    assert ll.to_layout(local, ll.TE).keys() == te.keys()
    assert all(torch.equal(v, te[k]) for k, v in ll.to_layout(local, ll.TE).items())
    if name == "llama":  # jobs/convert.py import --lm-layout te
        from mimo_ray.cli.convert import main as convert_main

        out = convert_main(["import", "--lm", str(hf_dirs[name]), "--output-dir", str(tmp_path / "cli"),
                            "--lm-layout", "te", *OVER])
        assert read_manifest(out["checkpoint"])["lm_layout"] == "te"


def test_te_layout_round_trip_and_cross_layout_load(hf_dirs, tmp_path, megatron_world):
    src = hf_dirs["llama"]
    over = [*OVER, "parallel.lm_tp=2"]
    cfg, step = import_run(str(src), None, None, str(tmp_path / "a"), "tiny", over, lm_layout="te")
    shards = [torch.load(part_file(step, "language_model", r), weights_only=True) for r in range(2)]
    norm = "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_weight"
    assert torch.equal(shards[0][norm], shards[1][norm])  # replicated under TP, like the local norms

    out = export_run(str(tmp_path / "a"), str(tmp_path / "hf"))
    before, after = load_file(f"{src}/model.safetensors"), load_file(f"{out['lm']}/model.safetensors")
    assert set(before) == set(after)
    for key, value in before.items():
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            after[key] = after[key][: value.shape[0]]  # the 3 modality tags' rows are added
        assert torch.equal(after[key], value), key
    te_state = full_state(step, cfg)  # TE names (export_lm tells the layout from the keys)
    assert ll.layout_of(te_state) == ll.TE
    direct = load_file(f"{export_lm(cfg, te_state, tmp_path / 'direct')}/model.safetensors")
    assert direct.keys() == after.keys() and all(torch.equal(direct[k][: after[k].shape[0]], after[k]) for k in after)

    # The TE-layout import (TP 2, joined for TP 1) loads into the local-layout model this machine builds, equal to
    # the local-layout import.
    _, local_step = import_run(str(src), None, None, str(tmp_path / "b"), "tiny", OVER)
    from_te, from_local = build_lm_part(cfg), build_lm_part(cfg)
    load_imported(from_te, step, "", 0, 1)
    load_imported(from_local, local_step, "", 0, 1)
    a, b = from_te.state_dict(), from_local.state_dict()
    assert "language_model.decoder.layers.0.input_layernorm.weight" in a
    for key, value in b.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(a[key], value), key
