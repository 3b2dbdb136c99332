"""Batched inference over an output-task manifest: prompts forced to end in the K generation tokens of the requested
output → LM group + output decoders → one PNG / WAV per row under ``<output stem>_media/``, referenced from the JSONL.
File names are the sanitised id plus a hash of the full id (:func:`~mimo_ray.media.output_files.output_file_name`),
so ids never collide or escape the media folder.

    summary = run_output_inference(cfg, step_dir, tokenizer, "data/val_out.jsonl", Path("preds.jsonl"), set(), rt)
    # preds.jsonl rows: {"id": "draw-00001", "output": "image_out", "file": "preds_media/draw-00001-1c0f….png",
    #                    "image_out_path": ".../preds_media/draw-00001-1c0f….png", "prompt", "target"}
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mimo_ray.config import Config
from mimo_ray.data.output_prompts import build_output_prompts, requested_output
from mimo_ray.data.output_source import check_outputs_enabled
from mimo_ray.data.output_tasks import OUTPUT_KEYS, OutputChatTokenizer, read_output_rows
from mimo_ray.data.tokenizer import ChatTokenizer, TokenizeError
from mimo_ray.media.output_files import write_output
from mimo_ray.model.output_generate import split_decoded

log = logging.getLogger("mimo_ray")


def _prompt_text(row: dict[str, Any]) -> str:
    turns = row.get("conversations") or []
    return str(turns[0].get("value", "")) if turns and isinstance(turns[0], dict) else ""


def _usable(tok: OutputChatTokenizer, outputs: dict[str, Any], row: dict[str, Any]) -> tuple[str, str] | None:
    """``None`` for a row that can be generated for, else ``(stage, error)``."""
    if not row.get("id"):
        return "manifest", "row has no id"
    try:
        requested_output(row, outputs)
        tok.encode_prompt(row.get("conversations"))
    except TokenizeError as err:
        return err.stage, str(err)
    except (ValueError, TypeError, AttributeError) as err:
        return "manifest", str(err)
    return None


def run_output_inference(
    cfg: Config, step_dir: Path, tokenizer: ChatTokenizer, data_path: str, out: Path, done: set[str], runtime: Any
) -> dict[str, Any]:
    """Generate a PNG or WAV for every row of ``data_path`` and append one JSONL row per id to ``out``.

    Args:
        cfg: the checkpoint's config with the command line's inference settings.
        step_dir: the checkpoint step directory (recorded in the summary).
        tokenizer: the checkpoint's chat tokenizer.
        data_path: output-task manifest.
        out: predictions JSONL, prepared by the caller (files go to ``<out without suffix>_media/``).
        done: ids already in ``out`` (``--resume``); they are skipped.
        runtime: an inference runtime with ``decode_outputs`` (fused or disaggregated).

    Returns:
        Summary: counts per output, samples/s, the media folder.
    """
    check_outputs_enabled(cfg, data_path, "--data-path")
    outputs = cfg.model.outputs.active()
    tok = OutputChatTokenizer(tokenizer, outputs)
    media_dir = out.with_name(out.stem + "_media")
    media_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_output_rows(data_path) if str(r.get("id")) not in done]
    counts: dict[str, int] = {"written": 0, "quarantined": 0, "skipped": len(done), **dict.fromkeys(outputs, 0)}
    good = []
    size = cfg.infer.batch_size
    t0 = time.perf_counter()
    with out.open("a") as fh:
        for index, row in enumerate(rows):
            problem = _usable(tok, outputs, row)
            if problem is None:
                good.append(row)
                continue
            rid = str(row.get("id") or f"<row {index}>")
            fh.write(json.dumps({"id": rid, "prediction": None, "stage": problem[0], "error": problem[1]}) + "\n")
            counts["quarantined"] += 1
        chunks = [good[i : i + size] for i in range(0, len(good), size)]
        prompts = [build_output_prompts(tok, outputs, chunk) for chunk in chunks]
        bar = tqdm(total=len(good), desc="infer-outputs", unit="sample", dynamic_ncols=True)
        try:
            results = runtime.decode_outputs(ids.numpy() for _, ids in prompts)
            for chunk, (names, _), decoded in zip(chunks, prompts, results, strict=True):
                for row, name, value in zip(chunk, names, split_decoded(names, decoded), strict=True):
                    path = write_output(name, value, media_dir, str(row["id"]), outputs[name])
                    target = next((row[k] for k in OUTPUT_KEYS if row.get(k)), None)
                    rec = {"id": str(row["id"]), "output": name, f"{name}_path": str(path),
                           "file": f"{media_dir.name}/{path.name}",  # relative to the JSONL's folder
                           "prompt": _prompt_text(row), "target": target}  # fmt: skip
                    fh.write(json.dumps(rec) + "\n")
                    counts["written"] += 1
                    counts[name] += 1
                fh.flush()
                bar.update(len(chunk))
        finally:
            bar.close()
    wall = time.perf_counter() - t0
    summary = {
        **counts,
        "wall_s": wall,
        "samples_per_s": counts["written"] / max(wall, 1e-9),
        "output": str(out),
        "media_dir": str(media_dir),
        "checkpoint": str(step_dir),
    }
    log.info("output inference: %s", json.dumps(summary))
    return summary
