"""A new modality ("depth") with two encoders of our own, trained disaggregated from an in-memory iterable, then
generated from. Copy this file and swap in your own encoders and data.

    python examples/custom_modality.py --steps 30 --out runs/example_depth

What a user provides: the encoder classes (any ``nn.Module`` whose ``forward`` takes the kwargs of
``modality_inputs[modality][encoder]``), a ``ModalitySubmodules`` subclass (or Megatron's own) that combines and
projects their outputs to ``[N_tokens, H_lm]`` batch-major rows, a special token id, the embedding rows per item
(``model.modality_tokens``) and the batches. The classes may live in this script (Ray ships them to the actors).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from megatron.core.models.mimo.submodules.base import ModalitySubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

import mimo_ray

DEPTH_TOKEN_ID = 270  # above the byte tokenizer's 266 ids, below model.lm.vocab_size (384 in the tiny preset)
SIDE = 16  # depth maps are [1, SIDE, SIDE]


class PatchDepthEncoder(torch.nn.Module):
    """Depth map ``[B, 1, 16, 16]`` → 4 patch tokens ``[B, 4, width]`` (a strided conv)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, width, kernel_size=8, stride=8)

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        return self.conv(depth).flatten(2).transpose(1, 2)  # [B, 4, width]


class StatsDepthEncoder(torch.nn.Module):
    """Depth map → one summary token ``[B, 1, width]`` from its mean and spread."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.GELU(), torch.nn.Linear(width, width))

    def forward(self, depth: torch.Tensor) -> torch.Tensor:
        stats = torch.stack([depth.mean(dim=(1, 2, 3)), depth.std(dim=(1, 2, 3))], dim=-1)  # [B, 2]
        return self.mlp(stats).unsqueeze(1)


class DepthSubmodules(ModalitySubmodules):
    """Runs every encoder, joins their tokens per sample (patch tokens, then the summary token) and projects them."""

    def encode(self, encoders_data_batch: dict) -> list[torch.Tensor]:
        return [encoder(**encoders_data_batch[name]) for name, encoder in self.encoders.items()]

    def combine_embeddings(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        joined = torch.cat(embeddings, dim=1)  # [B, 5, width]: per sample, batch-major as the alignment expects
        return joined.reshape(-1, joined.shape[-1])

    def project_embeddings(self, embeddings: list[torch.Tensor], is_input: bool = True) -> torch.Tensor:
        return self.input_projections[0](self.combine_embeddings(embeddings))

    def decode(self, embeddings: torch.Tensor, data_batch: dict) -> torch.Tensor:
        """Required by ``ModalitySubmodules``; depth is input-only (no output decoder), so MimoModel never calls it."""
        raise TypeError("depth is an input-only modality: it has no output decoder to decode embeddings with")

    def forward(self, encoder_inputs: dict) -> torch.Tensor | None:
        return self.project_embeddings(self.encode(encoder_inputs)) if encoder_inputs else None


def depth_model(cfg: mimo_ray.Config):
    """Our LM (from ``cfg``) plus the depth modality: two encoders, one projection to the LM width."""
    spec = mimo_ray.build_mimo_config(cfg)
    spec.modality_submodules_spec["depth"] = ModuleSpec(
        module=DepthSubmodules,
        submodules={
            "encoders": {
                "patches": ModuleSpec(module=PatchDepthEncoder),
                "stats": ModuleSpec(module=StatsDepthEncoder),
            },
            "input_projections": [
                ModuleSpec(module=torch.nn.Linear, params={"in_features": 32, "out_features": cfg.model.lm.hidden_size})
            ],
        },
    )
    spec.special_token_ids["depth"] = DEPTH_TOKEN_ID
    return spec


def read_depth(row: dict) -> dict:
    """Decode function for manifest rows (``Trainer(..., decoders={"depth": read_depth})``): ``row["depth"]`` names
    ``.npy`` depth maps ``[1, 16, 16]``, one per ``<depth>`` tag; runs in the Ray Data decode workers.
    """
    paths = row["depth"] if isinstance(row["depth"], list) else [row["depth"]]
    maps = np.stack([np.load(p) for p in paths]).astype(np.float32)  # [k, 1, 16, 16]
    return {"patches": {"depth": maps}, "stats": {"depth": maps}}


def depth_batches(cfg: mimo_ray.Config, spec, num_batches: int, seed: int = 0) -> list[dict]:
    """Global batches: a tilted plane, near (mean depth 0.2) or far (0.8); the answer is the word."""
    rng = np.random.default_rng(seed)
    size = cfg.data.global_batch_size
    batches = []
    for _ in range(num_batches):
        far = rng.integers(0, 2, size)
        ramp = np.linspace(-0.1, 0.1, SIDE, dtype=np.float32)
        depth = (np.where(far, 0.8, 0.2)[:, None, None] + ramp[None, :, None] + ramp[None, None, :]).astype(np.float32)
        depth += rng.normal(0, 0.02, depth.shape).astype(np.float32)
        rows = [
            mimo_ray.encode_conversation(
                cfg,
                [{"from": "human", "value": "<depth>How far is it?"}, {"from": "gpt", "value": "far" if f else "near"}],
                mimo_config=spec,
            )
            for f in far
        ]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        pixels = torch.from_numpy(depth[:, None])  # [B, 1, 16, 16]
        batch["modality_inputs"] = {"depth": {"patches": {"depth": pixels}, "stats": {"depth": pixels}}}
        batches.append(batch)
    return batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="runs/example_depth")
    parser.add_argument("--runtime", default="disaggregated", choices=["disaggregated", "fused"])
    args = parser.parse_args()

    cfg = mimo_ray.load_config("tiny", {
        "model.modalities": [],  # none of ours: the LM plus the depth modality below
        "model.modality_tokens": {"depth": 5},  # 4 patch tokens + 1 summary token per depth map
        "model.lm.seq_length": 64,
        "train": {"runtime": args.runtime, "max_steps": args.steps, "output_dir": args.out, "overwrite": True,
                  "ckpt_interval": args.steps, "lr": 3e-3, "warmup_steps": 5},
    })
    spec = depth_model(cfg)
    batches = depth_batches(cfg, spec, num_batches=8)
    with mimo_ray.Trainer(cfg, mimo_config=spec, data=batches) as trainer:
        result = trainer.fit()
    print(f"trained {result['steps']} steps: loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")

    near = np.full((1, SIDE, SIDE), 0.2, dtype=np.float32)
    far = np.full((1, SIDE, SIDE), 0.8, dtype=np.float32)
    prompts = [{"text": "<depth>How far is it?", "depth": {"patches": {"depth": d}, "stats": {"depth": d}}}
               for d in (near, far)]
    answers = mimo_ray.generate(result["checkpoint"], prompts, max_new_tokens=8, mimo_config=spec,
                                runtime=args.runtime)
    print(f"near map -> {answers[0]!r}; far map -> {answers[1]!r}")


if __name__ == "__main__":
    main()
