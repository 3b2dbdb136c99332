"""``mimo_ray.generate`` / ``mimo_ray.generate_ids``: prompt a trained (or imported) checkpoint from Python.

    texts = mimo_ray.generate("runs/x", ["Once upon a time"], chat_template="none")
    texts = mimo_ray.generate("runs/x", [{"text": "What happens?", "video": "clip.mp4"}])
    ids = mimo_ray.generate_ids("runs/x", [{"text": "<depth> describe", "depth": {"enc_a": {"x": arr}}}],
                                mimo_config=spec)

Prompts whose media are all files of our modalities (``video``, ``audio``, ``image``/``images``) go through exactly
the batched KV-cache path of ``jobs/infer.py`` (a prompt manifest → Ray Data decode → encoder group → LM group), so
the text is the same. Prompts with in-memory media — an array for one of our modalities, or encoder kwargs
``{encoder: {kwarg: array}}`` for any modality (a user's included) — are tokenised with the checkpoint's tokenizer,
batched in the driver and handed to the same inference runtime.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mimo_ray.config import Config

Prompt = str | Mapping[str, Any]
#: Prompt keys naming files of our modalities (``image`` is the job flag's and LLaVA's name for ``images``).
_FILE_KEYS = {"video": "video", "audio": "audio", "image": "images", "images": "images"}


def _cli_config(max_new_tokens: int, temperature: float, runtime: str | None, overrides: Any) -> Config:
    from mimo_ray.api.config import load_config

    cfg = load_config("tiny", overrides)
    infer = dataclasses.replace(cfg.infer, max_new_tokens=int(max_new_tokens), temperature=float(temperature))
    train = cfg.train if runtime is None else dataclasses.replace(cfg.train, runtime=runtime)
    return dataclasses.replace(cfg, infer=infer, train=train)


def _is_file_prompt(prompt: Prompt) -> bool:
    if isinstance(prompt, str):
        return True
    media = {k: v for k, v in prompt.items() if k != "text"}
    return all(k in _FILE_KEYS and isinstance(v, str | os.PathLike) for k, v in media.items())


def _manifest_rows(prompts: Sequence[Prompt], modalities: list[str]) -> list[dict[str, Any]]:
    """File prompts → manifest rows (a missing tag is prepended, as ``jobs/infer.py --prompt`` does)."""
    from mimo_ray.config import MODALITY_TAGS

    rows = []
    for i, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else str(prompt.get("text", ""))
        row: dict[str, Any] = {"id": f"prompt-{i}"}
        media = {} if isinstance(prompt, str) else {k: v for k, v in prompt.items() if k != "text"}
        for key, path in media.items():
            mod = _FILE_KEYS[key]
            if not Path(path).is_file():
                raise ValueError(f"prompt {i}: {key} file {str(path)!r} does not exist")
            row["image" if mod == "images" else mod] = str(Path(path).resolve())
            if MODALITY_TAGS[mod] not in text:
                text = f"{MODALITY_TAGS[mod]}\n{text}"
        if "video" in media and "audio" not in media and "audio" in modalities and "<audio>" not in text:
            text = f"<audio>{text}"  # the manifest reader takes the audio from the video file
        row["conversations"] = [{"from": "human", "value": text}]
        rows.append(row)
    return rows


def _via_manifest(cli: Config, step: Path, prompts: Sequence[Prompt], chat_template: str | None,
                  spec: Any) -> list[list[int]]:
    from mimo_ray.driver.infer_loop import run_inference

    state = json.loads((step / "driver.json").read_text())
    rows = _manifest_rows(prompts, list(state["config"]["model"]["modalities"]))
    with tempfile.TemporaryDirectory(prefix="mimo-generate-") as tmp:
        manifest = Path(tmp) / "prompts.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out = Path(tmp) / "preds.jsonl"
        run_inference(cli, str(step), str(manifest), str(out), chat_template=chat_template, spec=spec)
        by_id = {}
        for line in out.read_text().splitlines():
            row = json.loads(line)
            if row.get("prediction") is None:
                raise ValueError(f"prompt {row['id']}: {row.get('stage')}: {row.get('error')}")
            by_id[row["id"]] = row["token_ids"]
    return [by_id[f"prompt-{i}"] for i in range(len(prompts))]


def _encoder_inputs(cfg: Config, mod: str, value: Any, index: int) -> dict[str, dict[str, Any]]:
    """A prompt's in-memory media → ``{encoder: {kwarg: array [1, ...]}}``."""
    from mimo_ray.model.spec import INPUT_KWARG, encoder_name

    if isinstance(value, Mapping):
        out = {}
        for enc, kwargs in value.items():
            if not isinstance(kwargs, Mapping):
                raise ValueError(f"prompt {index}: {mod}[{enc!r}] must be {{kwarg: array}}")
            out[enc] = {k: np.asarray(v)[None] for k, v in kwargs.items()}
        return out
    if mod not in INPUT_KWARG:
        raise ValueError(f"prompt {index}: {mod!r} is a user modality: give its encoder kwargs "
                         f"{{encoder: {{kwarg: array}}}}")
    return {encoder_name(cfg.model, mod): {INPUT_KWARG[mod]: np.asarray(value)[None]}}


def _stack(parts: list[dict[str, dict[str, np.ndarray]]], mod: str) -> dict[str, dict[str, Any]]:
    import torch

    out: dict[str, dict[str, Any]] = {}
    for enc in parts[0]:
        out[enc] = {}
        for kwarg in parts[0][enc]:
            try:
                out[enc][kwarg] = torch.from_numpy(np.concatenate([p[enc][kwarg] for p in parts]))
            except (KeyError, ValueError) as err:
                raise ValueError(f"{mod}[{enc!r}][{kwarg!r}]: prompts of one batch disagree ({err})") from None
    return out


def _via_batches(cli: Config, step: Path, prompts: Sequence[Prompt], chat_template: str | None,
                 spec: Any) -> list[list[int]]:
    import torch

    from mimo_ray.data.tokenizer import ChatTokenizer, TokenizeError
    from mimo_ray.driver.infer_loop import config_for_checkpoint, spec_for_checkpoint
    from mimo_ray.runtime.inference import build_infer_runtime

    cfg = config_for_checkpoint(cli, step)
    state = json.loads((step / "driver.json").read_text())
    tokenizer = ChatTokenizer.from_dict(state["tokenizer"]) if "tokenizer" in state else ChatTokenizer.from_config(cfg)
    if chat_template is not None:
        tokenizer = tokenizer.with_template(chat_template)
    spec = spec_for_checkpoint(cfg, state, spec)
    encoded = []
    for i, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else str(prompt.get("text", ""))
        media = {} if isinstance(prompt, str) else {k: v for k, v in prompt.items() if k != "text"}
        inputs = {}
        for key, value in media.items():
            mod = _FILE_KEYS.get(key, key)
            if mod not in cfg.model.modalities:
                raise ValueError(f"prompt {i}: {key!r} is not a modality of this model ({cfg.model.modalities})")
            if isinstance(value, str | os.PathLike):
                raise ValueError(f"prompt {i}: {key} is a file; give every media of a call as files, or as arrays")
            tag = cfg.model.tag(mod)
            if tag not in text:
                text = f"{tag}\n{text}"
            inputs[mod] = _encoder_inputs(cfg, mod, value, i)
        try:
            enc = tokenizer.encode_prompt([{"from": "human", "value": text}])
        except TokenizeError as err:
            raise ValueError(f"prompt {i}: {err}") from None
        encoded.append((enc.ids[: enc.prompt_len], inputs))
    batches = []
    size = cfg.infer.batch_size
    for start in range(0, len(encoded), size):
        chunk = encoded[start : start + size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = np.full((len(chunk), width), tokenizer.pad_id, dtype=np.int64)
        position_ids = np.zeros((len(chunk), width), dtype=np.int64)
        for b, (ids, _) in enumerate(chunk):
            input_ids[b, : len(ids)] = ids
            position_ids[b, : len(ids)] = np.arange(len(ids))
        mods = sorted({m for _, inputs in chunk for m in inputs})
        batches.append({
            "input_ids": torch.from_numpy(input_ids),
            "position_ids": torch.from_numpy(position_ids),
            "prompt_lengths": torch.tensor([len(ids) for ids, _ in chunk]),
            "modality_inputs": {m: _stack([inp[m] for _, inp in chunk if m in inp], m) for m in mods},
            "ids": [f"prompt-{start + b}" for b in range(len(chunk))],
            "padding_side": "right",
        })
    params = {"max_new_tokens": cfg.infer.max_new_tokens, "temperature": cfg.infer.temperature,
              "top_p": cfg.infer.top_p, "seed": cfg.train.seed, "eos_id": tokenizer.eos_id,
              "pad_id": tokenizer.pad_id, "use_cache": True}
    runtime = build_infer_runtime(cfg, str(step), spec)
    try:
        streams: list[list[dict[str, Any]]] = [[] for _ in range(runtime.num_streams)]
        for k, batch in enumerate(batches):
            streams[k % len(streams)].append(batch)
        tokens: dict[str, list[int]] = {}
        for result in runtime.run(streams, params):
            for i, sample_id in enumerate(result["ids"]):
                tokens[sample_id] = [int(t) for t in result["tokens"][i]]
    finally:
        runtime.close()
    return [tokens[f"prompt-{i}"] for i in range(len(prompts))]


def generate_ids(
    checkpoint: str | os.PathLike,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    chat_template: str | None = None,
    mimo_config: Any = None,
    *,
    runtime: str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> list[list[int]]:
    """Generated token ids per prompt (for users with their own tokenizer); arguments as :func:`generate`."""
    from mimo_ray.driver import checkpoint as ckpt_lib

    if isinstance(prompts, str | Mapping):
        raise TypeError("prompts must be a list of prompts (strings or dicts)")
    step = ckpt_lib.resolve(checkpoint)
    cli = _cli_config(max_new_tokens, temperature, runtime, overrides)
    if not prompts:
        return []
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(**cli.cluster.init_kwargs())
        started = True
    try:
        if all(_is_file_prompt(p) for p in prompts):
            return _via_manifest(cli, step, prompts, chat_template, mimo_config)
        return _via_batches(cli, step, prompts, chat_template, mimo_config)
    finally:
        if started:
            from mimo_ray.data.ray_dataset import settle_ray_data_threads

            settle_ray_data_threads()  # no Ray Data thread may touch Ray after the shutdown
            ray.shutdown()


def generate(
    checkpoint: str | os.PathLike,
    prompts: Sequence[Prompt],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    chat_template: str | None = None,
    mimo_config: Any = None,
    *,
    runtime: str | None = None,
    overrides: Sequence[str] | Mapping[str, Any] | None = None,
) -> list[str]:
    """Generate text for each prompt with the checkpoint's batched KV-cache path (``jobs/infer.py``'s).

    Args:
        checkpoint: a run directory, its ``checkpoints/`` or a ``step_<N>`` directory (trained or imported).
        prompts: strings, or dicts ``{"text": str, <modality>: path | array | {encoder: {kwarg: array}}}``; a
            modality whose tag is missing from the text gets it prepended.
        max_new_tokens: tokens to generate at most per prompt.
        temperature: 0 for greedy decoding.
        chat_template: the checkpoint's template when ``None``; ``"none"`` sends raw text (plain completion).
        mimo_config: the ``MimoModelConfig`` of a run trained from a user spec object (runs built from our specs or
            from a recorded ``model.spec_factory`` need none).
        runtime: ``fused`` or ``disaggregated`` (default: ``train.runtime`` of ``overrides``).
        overrides: config overrides for inference (``infer.*``, ``parallel.*``, ``cluster.*``).

    Returns:
        One string per prompt, in order.

    Raises:
        ValueError: no checkpoint there, a missing media file, a modality the model lacks, a prompt the tokenizer
            rejects (naming the prompt).
    """
    from mimo_ray.data.tokenizer import ChatTokenizer

    ids = generate_ids(checkpoint, prompts, max_new_tokens, temperature, chat_template, mimo_config,
                       runtime=runtime, overrides=overrides)
    from mimo_ray.driver import checkpoint as ckpt_lib

    state = json.loads((ckpt_lib.resolve(checkpoint) / "driver.json").read_text())
    if "tokenizer" in state:
        tokenizer = ChatTokenizer.from_dict(state["tokenizer"])
    else:
        from mimo_ray.config_cli import config_from_dict

        tokenizer = ChatTokenizer.from_config(config_from_dict(state["config"]))
    return [tokenizer.decode(t) for t in ids]
