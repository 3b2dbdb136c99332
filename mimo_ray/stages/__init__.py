"""Stage logic (tensor math, no Ray): encoder ranks, language-model ranks, the fused reference, optimizer math."""

from mimo_ray.stages.base import Stage, stage_call
from mimo_ray.stages.encoder import EncoderStage
from mimo_ray.stages.fused import FusedStage
from mimo_ray.stages.language import LanguageStage
from mimo_ray.stages.streams import ListStream, random_streams

__all__ = [
    "EncoderStage",
    "FusedStage",
    "LanguageStage",
    "ListStream",
    "Stage",
    "random_streams",
    "stage_call",
]
