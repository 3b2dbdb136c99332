"""mimo_ray: Megatron MIMO (multimodal in / multimodal out) models trained and served disaggregated on Ray."""

__version__ = "0.1.0"
