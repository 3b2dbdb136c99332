"""Batched inference over a manifest: prompt batches → encoder group (forward-only) → LM generation with a KV
cache → ``preds.jsonl`` with exactly one row per input id (quarantined inputs get a row with their error).

    summary = run_inference(cfg, ckpt="runs/x/checkpoints", data_path="d/val.jsonl", output="preds.jsonl")
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mimo_ray.config import Config
from mimo_ray.config_cli import config_from_dict
from mimo_ray.driver import checkpoint as ckpt_lib

log = logging.getLogger("mimo_ray")


def config_for_checkpoint(cli: Config, ckpt: Path) -> Config:
    """The checkpoint's model/data/tokenizer config with the command line's infer, parallel, runtime and cluster.

    Inference must use exactly the shapes, special tokens and tokenizer the model was trained with.
    """
    state = json.loads((ckpt / "driver.json").read_text())
    trained = config_from_dict(state["config"])
    train = dataclasses.replace(trained.train, runtime=cli.train.runtime, step_timeout_s=cli.train.step_timeout_s)
    data = dataclasses.replace(
        trained.data,
        micro_batch_size=cli.infer.batch_size,
        global_batch_size=cli.infer.batch_size,
        num_decode_workers=cli.data.num_decode_workers,
    )
    return dataclasses.replace(trained, infer=cli.infer, parallel=cli.parallel, cluster=cli.cluster, train=train,
                               data=data)


def spec_for_checkpoint(cfg: Config, state: dict[str, Any], mimo_config: Any = None) -> Any:
    """The ``MimoModelConfig`` to rebuild a checkpoint's model from: ``mimo_config`` when given, else the run's
    ``model.spec_factory`` or our specs (``None``: the stages build them from ``cfg``).

    Raises:
        ValueError: the run was trained from a ``MimoModelConfig`` object (no factory recorded) and none is given.
    """
    if mimo_config is not None:
        from mimo_ray.model.spec_source import config_for_spec

        config_for_spec(cfg, mimo_config)  # validates its modalities and token ids
        return mimo_config
    record = state.get("spec") or {}
    if record.get("source") == "object" and not cfg.model.spec_factory:
        mods = sorted((record.get("structure") or {}).get("modalities", {}))
        raise ValueError(
            f"this checkpoint was trained from a user MimoModelConfig object (modalities {mods}) and records no "
            "model.spec_factory: pass the same spec as mimo_config= (mimo_ray.generate / Trainer), or train with "
            "mimo_config='package.module:function' so the run records how to rebuild it"
        )
    return None


def read_done(output: Path) -> set[str]:
    """Ids already written to ``output`` (for ``--resume``); a torn last line is dropped."""
    if not output.exists():
        return set()
    done, lines = set(), output.read_text().splitlines()
    good = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done.add(row["id"])
        good.append(line)
    output.write_text("".join(f"{line}\n" for line in good))
    return done


def answer_correct(prediction: str, answer: str | None) -> bool | None:
    """Exact match after trimming whitespace and case (``None`` without a reference answer)."""
    if answer is None:
        return None
    return prediction.strip().lower() == answer.strip().lower()


def write_prompt_manifest(prompts: list[str], media: dict[str, str], path: Path,
                          modalities: list[str] | None = None) -> Path:
    """Command-line prompts → a manifest (one human turn each; media for a single prompt, its tag prepended when the
    text lacks it; a video's own audio track stands in for ``--audio`` when the model has an audio modality).

    Raises:
        ValueError: media with more than one prompt, or a media file that does not exist.
    """
    from mimo_ray.data.tokenizer import MODALITY_TAGS

    tags = {"video": MODALITY_TAGS["video"], "audio": MODALITY_TAGS["audio"], "image": MODALITY_TAGS["images"]}
    if media and len(prompts) != 1:
        raise ValueError(f"--video/--audio/--image go with exactly one --prompt, got {len(prompts)} prompts")
    rows = []
    for i, text in enumerate(prompts):
        row: dict[str, Any] = {"id": f"prompt-{i}"}
        for field, file in media.items():
            if not Path(file).is_file():
                raise ValueError(f"--{field} {file!r} does not exist")
            row[field] = str(Path(file).resolve())
            if tags[field] not in text:
                text = f"{tags[field]}\n{text}"
        if "video" in media and "audio" not in media and "audio" in (modalities or []) and tags["audio"] not in text:
            text = f"{tags['audio']}{text}"  # the manifest reader takes the audio from the video file
        row["conversations"] = [{"from": "human", "value": text}]
        rows.append(row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_inference(
    cli: Config, ckpt: str, data_path: str, output: str, resume: bool = False, use_cache: bool = True,
    chat_template: str | None = None, spec: Any = None,
) -> dict[str, Any]:
    """Generate for every row of ``data_path`` and write ``output`` JSONL.

    Args:
        cli: the command line's config (infer, parallel, runtime, cluster sections are used).
        ckpt: a run dir, checkpoint dir or ``step_<N>`` dir.
        data_path: manifest (JSONL/Parquet).
        output: predictions JSONL; rows ``{id, prediction, answer, correct, num_generated_tokens, ...}`` or
            ``{id, error, stage, path}`` for quarantined inputs. An output-task manifest (``image_out`` /
            ``audio_out`` rows) writes PNG / WAV files instead, see :mod:`mimo_ray.driver.output_infer`.
        resume: skip ids already in ``output``.
        use_cache: KV-cache generation (``False``: re-run the whole prefix per token, the naive baseline).
        chat_template: replaces the checkpoint's template (a ``data.chat_template`` value; ``none``: raw text).
        spec: the ``MimoModelConfig`` of a run trained from a user spec object (see :func:`spec_for_checkpoint`).

    Returns:
        Summary: counts, samples/s, tokens/s, accuracy when answers are known.
    """
    from mimo_ray.data.infer_batches import prompt_streams
    from mimo_ray.data.tokenizer import ChatTokenizer
    from mimo_ray.runtime.inference import build_infer_runtime
    from mimo_ray.runtime.placement import stage_cpu_reservation

    step_dir = ckpt_lib.resolve(ckpt)
    cfg = config_for_checkpoint(cli, step_dir)
    state = json.loads((step_dir / "driver.json").read_text())
    tokenizer = ChatTokenizer.from_dict(state["tokenizer"]) if "tokenizer" in state else ChatTokenizer.from_config(cfg)
    if chat_template is not None:
        tokenizer = tokenizer.with_template(chat_template)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = read_done(out) if resume else set()
    if not resume and out.exists():
        out.unlink()
    spec = spec_for_checkpoint(cfg, state, spec)
    runtime = build_infer_runtime(cfg, str(step_dir), spec)
    from mimo_ray.data.output_source import is_output_manifest

    if is_output_manifest(data_path):
        from mimo_ray.driver.output_infer import run_output_inference

        try:
            return run_output_inference(cfg, step_dir, tokenizer, data_path, out, done, runtime)
        finally:
            runtime.close()
    streams, quarantined = prompt_streams(
        cfg, data_path, runtime.num_streams, skip_ids=done, tokenizer=tokenizer,
        reserved_cpus=stage_cpu_reservation(cfg),
    )  # fmt: skip
    params = {
        "max_new_tokens": cfg.infer.max_new_tokens,
        "temperature": cfg.infer.temperature,
        "top_p": cfg.infer.top_p,
        "seed": cfg.train.seed,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "use_cache": use_cache,
    }
    counts = {"written": 0, "correct": 0, "scored": 0, "generated_tokens": 0, "quarantined": 0, "skipped": len(done)}
    t0 = time.perf_counter()
    bar = tqdm(desc="infer", unit="sample", dynamic_ncols=True)
    try:
        with out.open("a") as fh:
            for bad in quarantined:
                if bad["id"] in done:
                    continue
                fh.write(json.dumps({"id": bad["id"], "prediction": None, **bad}) + "\n")
                counts["quarantined"] += 1
            for result in runtime.run(streams, params):
                for i, sample_id in enumerate(result["ids"]):
                    text = tokenizer.decode(result["tokens"][i])
                    answer = (result.get("answers") or [None] * len(result["ids"]))[i]
                    correct = answer_correct(text, answer)
                    row = {"id": sample_id, "prediction": text, "answer": answer, "correct": correct,
                           "num_generated_tokens": len(result["tokens"][i]),
                           "token_ids": [int(t) for t in result["tokens"][i]]}
                    meta = (result.get("meta") or [None] * len(result["ids"]))[i]
                    if meta:
                        row.update({k: v for k, v in meta.items() if k not in row})
                    fh.write(json.dumps(row) + "\n")
                    counts["written"] += 1
                    counts["generated_tokens"] += len(result["tokens"][i])
                    if correct is not None:
                        counts["scored"] += 1
                        counts["correct"] += int(correct)
                fh.flush()
                bar.update(len(result["ids"]))
    finally:
        bar.close()
        runtime.close()
    wall = time.perf_counter() - t0
    summary = {
        **counts,
        "wall_s": wall,
        "samples_per_s": counts["written"] / max(wall, 1e-9),
        "tokens_per_s": counts["generated_tokens"] / max(wall, 1e-9),
        "accuracy": counts["correct"] / counts["scored"] if counts["scored"] else None,
        "output": str(out),
        "checkpoint": str(step_dir),
    }
    log.info("inference: %s", json.dumps(summary))
    return summary
