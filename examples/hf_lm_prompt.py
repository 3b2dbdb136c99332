"""Import a Hugging Face LM alone (a text-only MIMO model) and prompt it from Python.

    python examples/hf_lm_prompt.py --lm hf/SmolLM2-135M --out runs/smol --prompt "The capital of France is"

Any local LLaMA-family or Qwen2 directory works (config.json, safetensors or bin weights, tokenizer.json); nothing
is downloaded. The imported run is a normal run directory: train it further with ``mimo_ray.Trainer`` (add
modalities with ``jobs/convert.py import --vision/--audio`` or your own ModuleSpecs).
"""

from __future__ import annotations

import argparse

import mimo_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", required=True, help="local Hugging Face LM directory")
    parser.add_argument("--out", default="runs/hf_lm")
    parser.add_argument("--prompt", action="append", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runtime", default="fused", choices=["disaggregated", "fused"])
    args = parser.parse_args()

    run = mimo_ray.import_pretrained(args.out, lm=args.lm)
    cfg = mimo_ray.load_config(run / "config.yaml")
    print(f"imported {args.lm} -> {run} (modalities {cfg.model.modalities}, {cfg.model.lm.num_layers} layers)")
    prompts = args.prompt or ["The capital of France is"]
    # Plain completion: the raw text with the tokenizer's own BOS, no chat template.
    for prompt, text in zip(prompts, mimo_ray.generate(run, prompts, max_new_tokens=args.max_new_tokens,
                                                       chat_template="none", runtime=args.runtime), strict=True):
        print(f"{prompt!r} -> {text!r}")


if __name__ == "__main__":
    main()
