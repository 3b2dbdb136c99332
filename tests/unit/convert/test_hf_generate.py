"""Acceptance: a checkpoint imported from a tiny LLaMA directory generates, through ``jobs/infer.py --prompt ...
--chat-template none`` exactly the greedy tokens of ``transformers`` (an LM imported for TP=2, joined for the fused
inference runtime)."""

from __future__ import annotations

import json

import pytest
import torch

from mimo_ray.convert.importer import import_run

transformers = pytest.importorskip("transformers")

PROMPTS = ["the cat sat on the", "what color is the dog ?", "one two three"]


def test_infer_prompt_raw_equals_transformers_greedy(hf_dirs, tmp_path, ray_local):
    from jobs.infer import main as infer_main

    src = hf_dirs["llama_small_vocab"]  # the tag ids lie past the HF rows: HF can never emit what we suppress
    import_run(str(src), None, None, str(tmp_path / "run"), "tiny",
               ["model.modalities=[]", "model.lm.seq_length=64", "parallel.lm_tp=2"])
    out = tmp_path / "out" / "preds.jsonl"
    infer_main(["--checkpoint", str(tmp_path / "run"), "--output", str(out), "--chat-template", "none",
                "--runtime", "fused", "--infer.max_new_tokens=8", "--infer.batch_size=2",
                *[a for p in PROMPTS for a in ("--prompt", p)]])
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(rows) == [f"prompt-{i}" for i in range(len(PROMPTS))]

    tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    for i, prompt in enumerate(PROMPTS):
        ids = tok(prompt, return_tensors="pt").input_ids
        assert ids[0, 0].item() == tok.bos_token_id
        with torch.no_grad():
            ref = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in ref:  # ours stops at eos without emitting it
            ref = ref[: ref.index(tok.eos_token_id)]
        row = rows[f"prompt-{i}"]
        assert row["token_ids"] == ref, (prompt, row)
        assert row["num_generated_tokens"] == len(ref)
    assert sum(len(r["token_ids"]) for r in rows.values()) >= 8  # not a trivial immediate <eos>
