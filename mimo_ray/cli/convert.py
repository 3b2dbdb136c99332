r"""Import local Hugging Face checkpoints into a mimo_ray run, or export a run back to Hugging Face directories.

Import: python jobs/convert.py import --lm hf/vicuna-7b [--vision hf/clip-vit-l-336] [--audio hf/whisper-base] \\
            --output-dir runs/avlm --preset llava-avlm-7b [--parallel.lm_tp=2 ...]
        → runs/avlm/config.yaml, runs/avlm/tokenizer/, runs/avlm/checkpoints/step_0000000 (train with
          python jobs/train.py --config runs/avlm/config.yaml --resume, or infer with --checkpoint runs/avlm)
Export: python jobs/convert.py export --checkpoint runs/avlm --output hf_out [--dtype bf16] [--max-shard-size 5GB]
        → hf_out/lm, hf_out/vision, hf_out/audio (what the run holds), each loadable with from_pretrained, and
          hf_out/mm_projector.safetensors (LLaVA keys model.mm_projector.0/2.weight/bias), audio_projector.safetensors
No downloads: every directory is local.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mimo_ray.observability import init_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF directories → a run with a step-0 checkpoint")
    imp.add_argument("--lm", help="LLaMA-family / Qwen2 directory (config.json, weights, tokenizer.json)")
    imp.add_argument("--vision", help="CLIPVisionModel / CLIPModel directory")
    imp.add_argument("--audio", help="Whisper directory (WhisperModel / WhisperForConditionalGeneration)")
    imp.add_argument("--output-dir", required=True, help="the new run directory")
    imp.add_argument("--preset", "--config", dest="preset", default="tiny", help="preset name or YAML path")
    imp.add_argument("--lm-layout", default="local", choices=("local", "te"),
                     help="LM layer-norm names: local (input_layernorm) or te (fused into linear_qkv / linear_fc1); "
                          "either loads into a model of either layout")
    exp = sub.add_parser("export", help="a run's checkpoint → HF directories")
    exp.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    exp.add_argument("--output", required=True, help="output directory (lm/, vision/, audio/, *_projector.safetensors)")
    exp.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="dtype of every weight file")
    exp.add_argument("--max-shard-size", default="5GB",
                     help="shard weights past this size, with an index JSON, like save_pretrained (5GB, 500MB)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Run ``import`` or ``export``; returns what was written.

    Raises:
        SystemExit: a bad flag, directory or checkpoint, with the message naming it.
    """
    ns, rest = _parser().parse_known_args(argv)
    init_logging("convert")
    try:
        if ns.command == "import":
            from mimo_ray.convert.importer import import_run

            cfg, step = import_run(ns.lm, ns.vision, ns.audio, ns.output_dir, ns.preset, rest, ns.lm_layout)
            out = {"checkpoint": str(step), "config": str(Path(ns.output_dir) / "config.yaml"),
                   "pretrained": dict(cfg.model.pretrained)}
        else:
            if rest:
                raise ValueError(f"export takes no overrides, got {rest}")
            from mimo_ray.convert.exporter import export_run

            out = {k: str(v) for k, v in export_run(ns.checkpoint, ns.output, ns.dtype, ns.max_shard_size).items()}
    except (ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
