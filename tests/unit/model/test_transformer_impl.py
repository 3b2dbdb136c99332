"""model.transformer_impl: which layer spec the LM gets, and the layer-name layouts (local vs transformer-engine).

Transformer-engine is never installed here: its GPT layer spec is built with :func:`spec_names.te_spec_without_te`
(no TE module is instantiated), and the parameter names it would create are read off the spec tree.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.extensions import transformer_engine as te_ext
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from spec_names import spec_param_names, te_spec_without_te

from mimo_ray.config_cli import load_config
from mimo_ray.model import build_lm_part
from mimo_ray.model import layers as layers_mod
from mimo_ray.model.layers import resolve_transformer_impl, te_available
from mimo_ray.model.spec import language_model_spec
from mimo_ray.parallel import layer_layout as ll

LLAMA = ["model.lm.normalization=RMSNorm", "model.lm.swiglu=true", "model.lm.add_bias_linear=false",
         "model.lm.untie_embeddings_and_output_weights=true", "model.lm.num_query_groups=2"]


def test_auto_is_local_on_this_machine_and_te_only_on_cuda_with_te(monkeypatch):
    assert not te_available() and not torch.cuda.is_available()
    model = load_config("tiny", []).model
    assert model.transformer_impl == "auto" and resolve_transformer_impl(model) == "local"
    monkeypatch.setattr(layers_mod, "te_available", lambda: True)
    assert resolve_transformer_impl(model, cuda=False) == "local"
    assert resolve_transformer_impl(model, cuda=True) == "transformer_engine"
    local = load_config("tiny", ["model.transformer_impl=local"]).model
    assert resolve_transformer_impl(local, cuda=True) == "local"


def test_transformer_impl_errors_name_the_field():
    te = load_config("tiny", ["model.transformer_impl=transformer_engine"]).model
    with pytest.raises(ValueError, match="model.transformer_impl='transformer_engine' needs transformer_engine"):
        resolve_transformer_impl(te)
    with pytest.raises(ValueError, match="model.transformer_impl"):
        load_config("tiny", ["model.transformer_impl=apex"])
    with pytest.raises(ValueError, match="contradicts model.transformer_impl='local'"):
        load_config("tiny", ["model.attention_backend=te", "model.transformer_impl=local"])


def test_lm_spec_is_megatrons_te_spec_when_auto_resolves_to_te(monkeypatch):
    model = load_config("tiny", LLAMA).model
    cpu = language_model_spec(model).params["transformer_layer_spec"].submodules
    assert cpu.input_layernorm is WrappedTorchNorm and cpu.pre_mlp_layernorm is WrappedTorchNorm
    monkeypatch.setattr(layers_mod, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with te_spec_without_te():
        spec = language_model_spec(model).params["transformer_layer_spec"]
    sub = spec.submodules
    assert sub.input_layernorm is IdentityOp and sub.pre_mlp_layernorm is IdentityOp
    assert sub.self_attention.submodules.linear_qkv is te_ext.TELayerNormColumnParallelLinear
    assert sub.self_attention.submodules.core_attention is te_ext.TEDotProductAttention
    assert sub.mlp.submodules.linear_fc1 is te_ext.TELayerNormColumnParallelLinear
    assert sub.self_attention.params["attn_mask_type"].name == "causal"


def _layer_names(model, te: bool) -> list[str]:
    spec = language_model_spec(model)
    if te:
        with te_spec_without_te():
            spec.params["transformer_layer_spec"] = layers_mod.te_layer_spec(causal=True)
    return spec_param_names(spec.params["transformer_layer_spec"], spec.params["config"])


@pytest.mark.parametrize("overrides", [LLAMA, []], ids=["llama", "tiny-layernorm-bias"])
def test_spec_names_are_the_built_models_and_rename_to_te_spec_names(megatron_world, overrides):
    model = load_config("tiny", overrides).model
    built = [n.removeprefix("language_model.decoder.layers.0.") for n, _ in build_lm_part(load_config(
        "tiny", overrides)).named_parameters() if n.startswith("language_model.decoder.layers.0.")]
    local = _layer_names(model, te=False)
    assert sorted(local) == sorted(built)  # the spec reader agrees with Megatron on the local layer
    te = _layer_names(model, te=True)
    assert sorted(ll.rename(f"layers.0.{n}", ll.TE) for n in local) == sorted(f"layers.0.{n}" for n in te)
    assert sorted(ll.rename(f"layers.0.{n}", ll.LOCAL) for n in te) == sorted(f"layers.0.{n}" for n in local)
    fused = {"self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"}
    assert fused <= set(te) and not any("layernorm" in n for n in te)
    assert ("self_attention.linear_qkv.layer_norm_bias" in te) == (model.lm.normalization == "LayerNorm")


def test_layout_helpers():
    local = {"language_model.decoder.layers.1.input_layernorm.weight": 1,
             "language_model.decoder.layers.1.pre_mlp_layernorm.bias": 2,
             "language_model.decoder.layers.1.mlp.linear_fc1.weight": 3,
             "language_model.decoder.layers.1.mlp.linear_fc1._extra_state": None,
             "language_model.decoder.final_layernorm.weight": 4}
    te = ll.to_layout(local, ll.TE)
    assert te == {"language_model.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight": 1,
                  "language_model.decoder.layers.1.mlp.linear_fc1.layer_norm_bias": 2,
                  "language_model.decoder.layers.1.mlp.linear_fc1.weight": 3,
                  "language_model.decoder.final_layernorm.weight": 4}
    assert ll.layout_of(local) == ll.LOCAL and ll.layout_of(te) == ll.TE and ll.layout_of(["a.weight"]) is None
    assert ll.to_layout(te, ll.LOCAL) == {k: v for k, v in local.items() if not k.endswith("_extra_state")}
    assert ll.to_layout(local, ll.LOCAL) == local
    assert ll.match_module(local, te) == te and ll.match_module(te, ["x.weight"]) == te
    assert ll.rename_all(list(local), te) == [ll.rename(k, ll.TE) for k in local]
    with pytest.raises(ValueError, match="layers under 'language_model.decoder.' mix the local and the transformer"):
        ll.layout_of([*local, *te])
    # A fused model with a TE LM and local encoders: each stack keeps its own layout.
    enc = "modality_submodules.video.encoders.clip.vit.decoder.layers.0."
    mixed_module = [*te, f"{enc}input_layernorm.weight", f"{enc}input_layernorm.bias"]
    assert ll.stack_layouts(mixed_module) == {"language_model.decoder.": ll.TE,
                                              "modality_submodules.video.encoders.clip.vit.decoder.": ll.LOCAL}
    state = {**local, f"{enc}input_layernorm.weight": 5, f"{enc}self_attention.linear_qkv._extra_state": None}
    assert ll.match_module(state, mixed_module) == {**te, f"{enc}input_layernorm.weight": 5,
                                                    f"{enc}self_attention.linear_qkv._extra_state": None}
    assert ll.rename_all(list(state), mixed_module)[:2] == list(te)[:2]
    with pytest.raises(ValueError, match="state dict mixes"):
        ll.layout_of(mixed_module)
    with pytest.raises(ValueError, match="layer layout 'fp8'"):
        ll.rename("layers.0.input_layernorm.weight", "fp8")
