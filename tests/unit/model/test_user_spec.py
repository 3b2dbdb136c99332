"""A model built from a user's ModuleSpecs (issue 20 items 2, 7): the spec is what every part builds from, parts are
seeded from their names, and a wrong batch fails with a message naming the modality, the encoder, the kwarg or the
sample and both counts."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import mimo_ray
from mimo_ray.data.user_batches import IterableBatchSource, split_global_batch
from mimo_ray.model import build_encoder_part, build_fused_model, build_lm_part
from mimo_ray.model.spec_source import config_for_spec

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def depth():
    spec = importlib.util.spec_from_file_location("mimo_example_depth_unit", ROOT / "examples" / "custom_modality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(depth):
    cfg = mimo_ray.load_config("tiny", {"model.modalities": [], "model.modality_tokens": {"depth": 5},
                                        "model.lm.seq_length": 64})
    spec = depth.depth_model(cfg)
    return config_for_spec(cfg, spec), spec


def _loss(model, batch):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                 loss_mask=batch["loss_mask"], modality_inputs=batch["modality_inputs"])


def test_build_mimo_config_is_what_the_runtimes_build(megatron_world):
    cfg = mimo_ray.load_config("tiny")
    spec = mimo_ray.build_mimo_config(cfg)
    assert sorted(spec.modality_submodules_spec) == ["audio", "video"]
    assert spec.special_token_ids == {"video": 261, "audio": 262}
    ours = build_fused_model(cfg).state_dict()
    theirs = build_fused_model(cfg, spec).state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if isinstance(ours[k], torch.Tensor))


def test_user_spec_parts_have_the_fused_models_weights(megatron_world, setup):
    cfg, spec = setup
    assert cfg.model.modalities == ["depth"] and cfg.model.special_token_ids["depth"] == 270
    fused = build_fused_model(cfg, spec).state_dict()
    enc = build_encoder_part(cfg, ["depth"], spec).state_dict()
    lm = build_lm_part(cfg, spec).state_dict()
    assert {f"modality_submodules.{k}" for k in enc} | set(lm) == set(fused)
    for k, v in enc.items():
        assert torch.equal(v, fused[f"modality_submodules.{k}"]), k
    assert any(k.startswith("modality_submodules.depth.encoders.stats.") for k in fused)


def test_wrong_batches_name_what_is_wrong(megatron_world, setup, depth):
    cfg, spec = setup
    model = build_fused_model(cfg, spec)
    cfg8 = cfg
    batch = depth.depth_batches(cfg8, spec, 1)[0]
    batch = {k: (v[:2] if k != "modality_inputs" else v) for k, v in batch.items()}
    pixels = batch["modality_inputs"]["depth"]["patches"]["depth"][:2]
    good = {"patches": {"depth": pixels}, "stats": {"depth": pixels}}
    loss, _ = _loss(model, {**batch, "modality_inputs": {"depth": good}})
    assert loss.shape == batch["input_ids"].shape

    with pytest.raises(ValueError, match=r"modality 'depth': no inputs for encoder 'stats' "
                                         r"\(modality_inputs\['depth'\] has \['patches'\]\)"):
        _loss(model, {**batch, "modality_inputs": {"depth": {"patches": {"depth": pixels}}}})
    with pytest.raises(ValueError, match=r"modality 'depth', encoder 'patches': missing input 'depth' "
                                         r"\(modality_inputs\['depth'\]\['patches'\] has \['pixels'\]\)"):
        _loss(model, {**batch, "modality_inputs": {"depth": {**good, "patches": {"pixels": pixels}}}})
    with pytest.raises(ValueError, match=r"the batch has modality_inputs for \['imu'\], which the model's "
                                         r"modality_submodules_spec lacks \(it has \['depth'\]\)"):
        _loss(model, {**batch, "modality_inputs": {"depth": good, "imu": {"enc": {"x": pixels}}}})
    with pytest.raises(ValueError, match=r"10 'depth' placeholder tokens \(id 270\) but no 'depth' embeddings were "
                                         r"given \(samples \[0, 1\] hold them"):
        _loss(model, {**batch, "modality_inputs": {}})
    # Sample 1 has one placeholder too few: the encoders made 5 rows per sample.
    ids = batch["input_ids"].clone()
    ids[1, (ids[1] == 270).nonzero()[0]] = 65
    with pytest.raises(ValueError, match=r"modality 'depth': 9 placeholder tokens in input_ids but 10 embedding rows "
                                         r"\(5 rows per sample from the encoder; sample 1 has 4 placeholders\); "
                                         r"placeholders per sample \[5, 4\]"):
        _loss(model, {**batch, "input_ids": ids, "modality_inputs": {"depth": good}})


def test_global_batches_split_into_micro_batches_and_errors_name_the_item(setup, depth):
    cfg, spec = setup
    batches = depth.depth_batches(cfg, spec, 2)
    micro = split_global_batch(batches[0], cfg, 0)
    assert len(micro) == 2 and micro[1]["ids"] == [f"batch-0-{i}" for i in range(4, 8)]
    assert torch.equal(micro[1]["modality_inputs"]["depth"]["stats"]["depth"],
                       batches[0]["modality_inputs"]["depth"]["stats"]["depth"][4:8])
    bad = {**batches[1], "labels": batches[1]["labels"][:6]}
    with pytest.raises(ValueError, match=r"data item 1\['labels'\] has shape \(6, 64\); expected \[8, S\]"):
        split_global_batch(bad, cfg, 1)
    ragged = {**batches[1], "modality_inputs": {"depth": {"patches": {"depth": torch.zeros(6, 1, 16, 16)}}}}
    with pytest.raises(ValueError, match=r"data item 1\['modality_inputs'\]\['depth'\]\['patches'\]\['depth'\] has 6 "
                                         r"rows for a global batch of 8 samples"):
        split_global_batch(ragged, cfg, 1)
    with pytest.raises(RuntimeError, match="the data iterable ended after 2 global batches"):
        source = IterableBatchSource(cfg, iter(batches))
        for _ in range(3):
            source.next_step()
    # A resume skips the consumed global batches; a list starts a new pass when it ends.
    source = IterableBatchSource(cfg, batches, start_sample=8)
    assert source.next_step()[0]["ids"][0] == "batch-1-0" and source.next_step()[0]["ids"][0] == "batch-0-0"


def test_config_names_a_bad_key_value_or_modality():
    with pytest.raises(ValueError, match="unknown config key 'lrr' in train"):
        mimo_ray.load_config("tiny", {"train.lrr": 1})
    with pytest.raises(ValueError, match=r"model.modalities\[\]='text' is not allowed"):
        mimo_ray.load_config("tiny", ["model.modalities=[text]"])
    with pytest.raises(ValueError, match="model.special_token_ids has no id for modality 'depth'"):
        mimo_ray.load_config("tiny", ["model.modalities=[depth]"])
    cfg = mimo_ray.load_config("tiny", {"model.modalities": ["depth"], "model.special_token_ids": {"depth": 270}})
    with pytest.raises(ValueError, match=r"model.modalities names 'depth', for which mimo_ray builds no spec"):
        mimo_ray.build_mimo_config(cfg)
    with pytest.raises(ValueError, match=r"model.spec_factory='nope:f': cannot import 'nope'"):
        mimo_ray.build_mimo_config(mimo_ray.load_config("tiny", ["model.spec_factory=nope:f"]))
    assert mimo_ray.load_config("tiny", {"train": {"lr": 1e-4}}).train.lr == 1e-4
