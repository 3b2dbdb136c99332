"""train.init_from: a NEW run from another run's weights (fused runtime, tiny preset, random data, no Ray).

Stage 1 trains 2 steps; stage 2 starts from its weights with its own run id, step 0, LR schedule and optimizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mimo_ray.cli.train import main as train_main
from mimo_ray.config_cli import load_config
from mimo_ray.driver import checkpoint as ckpt
from mimo_ray.driver.init_from import checkpoint_full_state, module_of
from mimo_ray.driver.schedule import lr_at
from mimo_ray.driver.train_loop import TrainLoop
from mimo_ray.observability import read_metrics
from mimo_ray.parallel.imported_layout import lm_tp_layout
from mimo_ray.parallel.tp_shards import shard

BASE = ["--runtime", "fused", "--data.global_batch_size=2", "--data.micro_batch_size=2"]


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage1")
    train_main(["--preset", "tiny", *BASE, "--max-steps", "2", "--lr", "1e-3", "--output-dir", str(out)])
    return out


def weights_at_step0(overrides: list[str]) -> tuple[dict[str, torch.Tensor], TrainLoop]:
    """The fused model's parameters right before its first step, and the loop (run to its end)."""
    cfg = load_config("tiny", [*BASE, *overrides])
    seen: dict[str, torch.Tensor] = {}

    def hook(step: int) -> None:
        if step == 0:
            seen.update(loop.runtime.named_parameters_full())

    with TrainLoop.build(cfg, on_step_start=hook) as loop:
        loop.summary = loop.run()
    return seen, loop


def test_init_from_starts_a_new_run_at_step_0_with_the_source_weights(stage1: Path, tmp_path: Path) -> None:
    source = checkpoint_full_state(ckpt.resolve(stage1), swiglu=False)
    out = tmp_path / "stage2"
    params, loop = weights_at_step0(
        ["--init-from", str(stage1), "--max-steps", "1", "--lr", "2e-5", "--train.min_lr=0", "--output-dir", str(out)]
    )
    assert len(params) > 50
    for name, value in params.items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)  # bit-identical start
    s1 = json.loads((stage1 / "summary.json").read_text())
    assert loop.summary["run_id"] != s1["run_id"] and loop.summary["resumed_from"] is None
    assert loop.summary["init_from"] == {
        "checkpoint": str(ckpt.resolve(stage1)),
        "modules": sorted({module_of(k) for k in source}),
    }
    train = [r for r in read_metrics(out / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1]  # step 0 → 1, not 2 → 3
    assert train[0]["lr"] == pytest.approx(lr_at(loop.cfg.train, 0)) == pytest.approx(2e-5 / 2)  # warm-up 1/2
    assert json.loads((out / "run.json").read_text())["init_from"]["checkpoint"] == str(ckpt.resolve(stage1))
    # The fresh optimizer: the new checkpoint's AdamW step count is 1, not 3.
    state = torch.load(out / "checkpoints" / "step_0000001" / "fused" / "tp0.pt", weights_only=True)
    assert {int(v["step"]) for v in state["optimizer"]["state"].values()} == {1}


def test_init_from_modules_takes_only_the_projections(stage1: Path, tmp_path: Path) -> None:
    source = checkpoint_full_state(ckpt.resolve(stage1), swiglu=False)
    fresh, _ = weights_at_step0(["--max-steps", "1", "--output-dir", str(tmp_path / "fresh")])
    params, loop = weights_at_step0(
        [
            "--init-from",
            str(stage1),
            "--init-from-modules=[projections]",
            "--max-steps",
            "1",
            "--output-dir",
            str(tmp_path / "proj"),
        ]
    )
    taken = [n for n in params if module_of(n) == "projections"]
    assert len(taken) >= 4 and loop.summary["init_from"]["modules"] == ["projections"]
    for name, value in params.items():
        want = source[name] if name in taken else fresh[name]
        torch.testing.assert_close(value, want, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(source[n], fresh[n]) for n in params if n not in taken)  # stage 1 did move them


def test_init_from_a_disaggregated_tp2_layout(stage1: Path, tmp_path: Path) -> None:
    # Re-save stage 1 as the disaggregated runtime with LM TP=2 writes it: encoder-shared/tp0.pt, lm/tp{0,1}.pt.
    step = ckpt.resolve(stage1)
    fused = torch.load(step / "fused" / "tp0.pt", weights_only=True)["model"]
    other = tmp_path / "disagg" / "checkpoints" / "step_0000002"
    for role in ("encoder-shared", "lm"):
        (other / role).mkdir(parents=True)
    enc = {k[len("modality_submodules.") :]: v for k, v in fused.items() if k.startswith("modality_submodules.")}
    torch.save({"model": enc, "optimizer": {}}, other / "encoder-shared" / "tp0.pt")
    lm = {k: v for k, v in fused.items() if k.startswith("language_model.") and isinstance(v, torch.Tensor)}
    for r in range(2):
        part = {k: shard(v, 2, r, *w) if (w := lm_tp_layout(k, False)) else v for k, v in lm.items()}
        torch.save({"model": part, "optimizer": {}}, other / "lm" / f"tp{r}.pt")
    for name in ("driver.json", "COMPLETE"):
        (other / name).write_bytes((step / name).read_bytes())
    params, _ = weights_at_step0(
        ["--init-from", str(other), "--max-steps", "1", "--output-dir", str(tmp_path / "from_disagg")]
    )
    source = checkpoint_full_state(step, swiglu=False)
    for name, value in params.items():
        torch.testing.assert_close(value, source[name], rtol=0, atol=0, msg=name)


def test_shape_mismatch_names_the_tensor(stage1: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError,
        match=r"modality_submodules\.\w+\.input_projections\.\S+ has shape \[\d+(, \d+)?\], "
        r"the model expects",
    ):
        weights_at_step0(
            [
                "--init-from",
                str(stage1),
                "--init-from-modules=[projections]",
                "--hidden-size",
                "32",
                "--max-steps",
                "1",
                "--output-dir",
                str(tmp_path / "bad"),
            ]
        )


def test_bad_sources_fail_before_training(stage1: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no complete checkpoint at"):
        train_main(
            ["--preset", "tiny", *BASE, "--init-from", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "x")]
        )
    with pytest.raises(SystemExit, match="is a checkpoint of this run's own --output-dir"):
        train_main(["--preset", "tiny", *BASE, "--init-from", str(stage1), "--output-dir", str(stage1), "--overwrite"])
    with pytest.raises(ValueError, match=r"train.min_lr=0.0001 exceeds train.lr=2e-05"):
        load_config("tiny", [*BASE, "--lr", "2e-5"])
    with pytest.raises(ValueError, match=r"train.init_from_modules\[\]='heads' is not allowed"):
        load_config("tiny", [*BASE, "--init-from", str(stage1), "--init-from-modules=[heads]"])


def test_each_lm_rank_slices_the_full_lm_for_its_tp_size(stage1: Path, tmp_path: Path) -> None:
    from mimo_ray.driver.init_from import prepare_init
    from mimo_ray.parallel.imported_layout import imported_state
    from mimo_ray.parallel.tp_shards import unshard

    cfg = load_config("tiny", [*BASE, "--init-from", str(stage1), "--output-dir", str(tmp_path / "tp2")])
    init = prepare_init(cfg)
    source = checkpoint_full_state(ckpt.resolve(stage1), swiglu=False)
    lm_keys = [k for k in source if k.startswith("language_model.") and not k.endswith("_extra_state")]
    vocab = source["language_model.embedding.word_embeddings.weight"].shape[0]
    ranks = [imported_state(init, lm_keys, "", r, 2, vocab_rows=vocab)[0] for r in range(2)]
    sliced = 0
    for key in lm_keys:
        where = lm_tp_layout(key, False)
        if where is None:
            assert torch.equal(ranks[0][key], source[key]) and torch.equal(ranks[1][key], source[key]), key
            continue
        sliced += 1
        assert ranks[0][key].shape[where[0]] * 2 == source[key].shape[where[0]], key
        assert torch.equal(unshard([ranks[0][key], ranks[1][key]], *where), source[key]), key
    assert sliced >= 6
