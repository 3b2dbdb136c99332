"""Train on a manifest from Python, then generate from the checkpoint. Copy this file and point it at your data.

    python examples/train_manifest.py --data D/train.jsonl --val D/val.jsonl --steps 200 --out runs/example_av
    python examples/train_manifest.py --synthetic 48 --steps 20        # makes a small synthetic audio-video set first

A manifest is LLaVA-style JSONL (datasets/README.md): ``{"id", "video"?, "audio"?, "image"?, "conversations"}``;
Ray Data decodes the media in parallel and quarantines bad rows (``<out>/quarantine.jsonl``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mimo_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="training manifest (JSONL)")
    parser.add_argument("--val", help="manifest to prompt from after training")
    parser.add_argument("--synthetic", type=int, default=0, help="make this many synthetic clips instead of --data")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runtime", default="disaggregated", choices=["disaggregated", "fused"])
    parser.add_argument("--out", default="runs/example_av")
    args = parser.parse_args()
    if args.synthetic:
        from mimo_ray.cli.synthetic import load_synthetic_module  # the maker of datasets/make_synthetic.py

        data_dir = Path(args.out) / "data"
        load_synthetic_module().make_synthetic(data_dir, args.synthetic, seconds=2.0, fps=8, size=(32, 32), seed=0)
        args.data, args.val = str(data_dir / "train.jsonl"), str(data_dir / "val.jsonl")
    if not args.data:
        parser.error("give --data (a manifest) or --synthetic N")

    cfg = mimo_ray.load_config("tiny", {"train": {"runtime": args.runtime, "max_steps": args.steps,
                                                  "output_dir": str(Path(args.out) / "run"), "overwrite": True,
                                                  "ckpt_interval": args.steps}})
    with mimo_ray.Trainer(cfg, data=args.data) as trainer:
        result = trainer.fit()
    print(f"trained {result['steps']} steps: loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}; "
          f"quarantined {result['quarantined']}; checkpoint {result['checkpoint']}")

    if args.val:
        base = Path(args.val).parent
        rows = [json.loads(line) for line in Path(args.val).read_text().splitlines()][:4]
        prompts = []
        for row in rows:
            prompt = {"text": row["conversations"][0]["value"], "video": str(base / row["video"])}
            if row.get("audio"):
                prompt["audio"] = str(base / row["audio"])
            prompts.append(prompt)
        answers = mimo_ray.generate(result["checkpoint"], prompts, max_new_tokens=12, runtime=args.runtime)
        for row, answer in zip(rows, answers, strict=True):
            print(f"{row['id']}: {answer!r} (reference {row['conversations'][1]['value']!r})")


if __name__ == "__main__":
    main()
