"""The public API (DESIGN.md C13): what driver scripts import from :mod:`mimo_ray`. Everything else is internal.

cfg = mimo_ray.load_config("tiny", ["train.max_steps=5"])
spec = mimo_ray.build_mimo_config(cfg)            # a Megatron MimoModelConfig: add your ModuleSpecs
with mimo_ray.Trainer(cfg, mimo_config=spec, data=batches) as trainer:
result = trainer.fit()
texts = mimo_ray.generate(result["checkpoint"], ["Hello"], mimo_config=spec)
"""

from __future__ import annotations

from mimo_ray.api.config import load_config
from mimo_ray.api.generate import generate, generate_ids
from mimo_ray.api.pretrained import import_pretrained
from mimo_ray.api.tokenize import encode_conversation
from mimo_ray.api.trainer import Trainer
from mimo_ray.config import Config
from mimo_ray.model.spec_source import build_mimo_config

__all__ = [
    "Config",
    "Trainer",
    "build_mimo_config",
    "encode_conversation",
    "generate",
    "generate_ids",
    "import_pretrained",
    "load_config",
]
