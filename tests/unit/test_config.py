import dataclasses

import pytest

from mimo_ray.config import Config
from mimo_ray.config_cli import FLAG_ALIASES, load_config, parse_job_args, save_config


@pytest.mark.parametrize("preset", ["tiny", "bench-s", "bench-l", "avlm-7b"])
def test_presets_load_and_round_trip(preset, tmp_path):
    cfg = load_config(preset)
    assert cfg.preset == preset
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(str(tmp_path / "c.yaml")) == cfg


def test_preset_shapes():
    s, l7 = load_config("bench-s"), load_config("avlm-7b")
    assert (s.model.vision.hidden_size, s.model.vision.patch_dim, s.model.vision.img_size) == (768, 16, 224)
    assert (s.model.lm.seq_length, s.model.audio.max_audio_tokens, s.model.audio.audio_seq_len) == (2048, 1500, 375)
    assert load_config("bench-l").model.lm.hidden_size == 2048
    assert (l7.model.lm.num_layers, l7.model.lm.hidden_size, l7.model.lm.ffn_hidden_size) == (32, 4096, 11008)
    assert l7.model.vision.img_size == 336 and l7.model.lm.normalization == "RMSNorm"


def test_seed_flags_override():
    cfg = load_config(
        "tiny",
        [
            "--num-layers", "3", "--hidden-size=96", "--num-attention-heads", "6", "--seq-length", "256",
            "--vision-backbone-type", "clip", "--audio-backbone-type", "beats", "--num-frames", "8",
            "--audio-seq-len", "12", "--data-path", "/x/train.jsonl", "train.lr=3e-4", "--model.vision.num_layers=1",
        ],
    )
    lm = cfg.model.lm
    assert (lm.num_layers, lm.hidden_size, lm.num_attention_heads, lm.seq_length) == (3, 96, 6, 256)
    assert cfg.model.audio.backbone_type == "beats" and cfg.model.audio.audio_seq_len == 12
    assert cfg.model.vision.num_frames == 8 and cfg.model.vision.num_layers == 1
    assert cfg.data.data_path == "/x/train.jsonl" and cfg.train.lr == pytest.approx(3e-4)


def test_flag_list_is_closed():
    # The seed's Megatron names must stay accepted; adding flags is a conscious change to this list.
    assert set(FLAG_ALIASES) == {
        "--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size", "--seq-length",
        "--vocab-size", "--vision-backbone-type", "--audio-backbone-type", "--num-frames", "--audio-seq-len",
        "--attention-backend", "--data-path", "--val-path", "--micro-batch-size", "--global-batch-size",
        "--tensor-model-parallel-size", "--runtime", "--max-steps", "--lr", "--seed", "--output-dir",
        "--max-failures", "--checkpoint", "--output", "--init-from", "--init-from-modules",
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--audio-backbone-type", "foo"], "model.audio.backbone_type='foo' is not allowed; choose one of whisper"),
        (["--vision-backbone-type", "siglip"], "model.vision.backbone_type='siglip' is not allowed; choose one"),
        (["--num-layers", "0"], "model.lm.num_layers=0 is not allowed; must be > 0"),
        (["--num-layers", "two"], "model.lm.num_layers='two' is not a valid int"),
        (["--runtime", "mpi"], "train.runtime='mpi' is not allowed; choose one of disaggregated, fused"),
        (["--audio-seq-len", "500"], "model.audio.audio_seq_len=500 exceeds the 100 positions"),
        (["--hidden-size", "66"], "model.lm.hidden_size=66 must be divisible by model.lm.num_attention_heads=4"),
        (["model.lm.nope=1"], "unknown config key 'nope' in model.lm"),
        (["--bogus-flag", "1"], "unknown flag '--bogus-flag'"),
        (["--num-frames"], "flag '--num-frames' needs a value"),
        (["parallel.lm_tp=3"], "parallel.lm_tp=3 must divide model.lm.num_attention_heads=4"),
    ],
)
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset_lists_known():
    known = "avlm-7b, bench-l, bench-s, llava-avlm-7b, tiny"
    with pytest.raises(ValueError, match=f"unknown preset 'huge'; known presets: {known}"):
        load_config("huge")


def test_yaml_base_inheritance_and_unknown_keys(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: tiny\nmodel:\n  lm:\n    num_layers: 5\n")
    cfg = load_config(str(tmp_path / "mine.yaml"))
    assert cfg.model.lm.num_layers == 5 and cfg.model.lm.hidden_size == 64
    (tmp_path / "bad.yaml").write_text("base: tiny\ntrain:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rate' in train"):
        load_config(str(tmp_path / "bad.yaml"))


def test_parse_job_args_names_bad_flag(capsys):
    cfg, _ = parse_job_args(["--preset", "tiny", "--max-steps", "7", "--resume"])
    assert cfg.train.max_steps == 7 and cfg.train.resume is True
    with pytest.raises(SystemExit) as err:
        parse_job_args(["--max-steps", "-1"])
    assert err.value.code == 2
    assert "train.max_steps=-1 is not allowed" in capsys.readouterr().err


def test_grad_accum_and_dataclass_tree():
    cfg = load_config("tiny", ["data.global_batch_size=16", "data.micro_batch_size=4", "parallel.lm_dp=2"])
    assert cfg.grad_accum_steps == 2
    assert {f.name for f in dataclasses.fields(Config)} >= {"model", "data", "parallel", "train", "infer", "cluster"}
