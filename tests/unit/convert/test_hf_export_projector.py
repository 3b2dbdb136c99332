"""Export writes the projectors in LLaVA's layout, any dtype, and shards past --max-shard-size like save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mimo_ray.cli.convert import main as convert_main
from mimo_ray.cli.train import main as train_main
from mimo_ray.convert.hf_save import parse_size, shard_plan
from mimo_ray.convert.importer import import_run
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver.init_from import checkpoint_full_state

transformers = pytest.importorskip("transformers")

OVER = ["model.modalities=[video,audio]", "model.vision.tokens_per_frame=4", "model.vision.feature_layer=-2",
        "model.audio.clip_seconds=1.0", "model.audio.audio_seq_len=8", "model.lm.seq_length=64",
        "model.lm.make_vocab_size_divisible_by=16"]  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(hf_dirs, tmp_path_factory) -> Path:
    """A run started with --init-from a step-0 import of tiny HF models, trained one fused step (so it holds
    trained projectors)."""
    imported, run = tmp_path_factory.mktemp("imported"), tmp_path_factory.mktemp("run")
    lm, vision, audio = (str(hf_dirs[k]) for k in ("llama_small_vocab", "clip", "whisper"))
    import_run(lm, vision, audio, str(imported), "tiny", OVER)
    train_main(["--config", str(imported / "config.yaml"), "--init-from", str(imported), "--output-dir", str(run),
                "--runtime", "fused", "--max-steps", "1", "--data.micro_batch_size=2", "--data.global_batch_size=2"])
    # Every imported tensor arrived: the LM, CLIP and Whisper weights before the step equal the import's.
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init_from"] == {"checkpoint": str(ckpt.resolve(imported)), "modules": ["audio", "lm", "vision"]}
    return run


def test_projectors_export_under_llava_names_equal_to_the_run(trained_run: Path, tmp_path: Path) -> None:
    out = convert_main(["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / "hf")])
    assert set(out) == {"lm", "vision", "audio", "mm_projector", "audio_projector"}
    state = checkpoint_full_state(ckpt.resolve(trained_run), swiglu=True)
    for name, modality in (("mm_projector", "video"), ("audio_projector", "audio")):
        got = load_file(tmp_path / "hf" / f"{name}.safetensors")
        assert sorted(got) == [f"model.{name}.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
        root = f"modality_submodules.{modality}.input_projections.0.encoder."
        for index, ours in ((0, "linear_fc1"), (2, "linear_fc2")):
            for p in ("weight", "bias"):
                assert got[f"model.{name}.{index}.{p}"].dtype == torch.float32
                assert torch.equal(got[f"model.{name}.{index}.{p}"], state[f"{root}{ours}.{p}"]), (name, index, p)
    # LLaVA's mlp2x_gelu module loads the file: Sequential(Linear, GELU, Linear) with hidden -> lm hidden shapes.
    w0, w2 = state["modality_submodules.video.input_projections.0.encoder.linear_fc1.weight"], None
    w2 = state["modality_submodules.video.input_projections.0.encoder.linear_fc2.weight"]
    mlp = torch.nn.Sequential(torch.nn.Linear(w0.shape[1], w0.shape[0]), torch.nn.GELU(),
                              torch.nn.Linear(w2.shape[1], w2.shape[0]))  # fmt: skip
    got = load_file(tmp_path / "hf" / "mm_projector.safetensors")
    mlp.load_state_dict({k.removeprefix("model.mm_projector."): v for k, v in got.items()}, strict=True)


def test_sharded_bf16_export_has_a_complete_index_and_loads(trained_run: Path, tmp_path: Path) -> None:
    full = convert_main(["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / "fp32")])
    out = convert_main(["export", "--checkpoint", str(trained_run), "--output", str(tmp_path / "bf16"),
                        "--dtype", "bf16", "--max-shard-size", "20KB"])  # fmt: skip
    lm = Path(out["lm"])
    index = json.loads((lm / "model.safetensors.index.json").read_text())
    shards = sorted(lm.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (lm / "model.safetensors").exists()
    on_disk = {k: f.name for f in shards for k in load_file(f)}
    reference = load_file(Path(full["lm"]) / "model.safetensors")
    assert index["weight_map"] == on_disk and set(on_disk) == set(reference)  # every key, in the file it names
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in reference.values())
    for f in shards:  # each shard within the limit unless it holds a single larger tensor
        tensors = load_file(f)
        assert sum(v.numel() * 2 for v in tensors.values()) <= 20_000 or len(tensors) == 1
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(lm), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.dtype == torch.bfloat16
    for key, value in model.state_dict().items():
        if key in reference:
            assert torch.equal(value, reference[key].to(torch.bfloat16)), key
    assert json.loads((lm / "config.json").read_text())["torch_dtype"] == "bfloat16"
    proj = load_file(Path(out["mm_projector"]))
    assert {v.dtype for v in proj.values()} == {torch.bfloat16}


def test_shard_sizes_and_bad_options() -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size(1000) == 1000
    tensors = {k: torch.zeros(n) for k, n in (("a", 100), ("b", 100), ("c", 300), ("d", 10))}
    assert shard_plan(tensors, 800) == [["a", "b"], ["c"], ["d"]]  # 400 + 400 bytes, then 1200 alone, then 40
    with pytest.raises(ValueError, match=r"--max-shard-size '5 gigs'"):
        parse_size("5 gigs")
    with pytest.raises(SystemExit):
        convert_main(["export", "--checkpoint", "x", "--output", "y", "--dtype", "int8"])
