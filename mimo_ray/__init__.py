"""mimo_ray: Megatron MIMO (multimodal in / multimodal out) models trained and served disaggregated on Ray."""

import warnings as _warnings

# megatron-core warns at import that TE/Apex are missing and that MIMO is experimental; on CPU both are expected.
# Set here so every process that imports any part of mimo_ray (driver, actors, Ray Data workers) is quiet.
for _pattern in (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*experimental and still under active development.*",
    ".*full scope is deprecated.*",
):
    _warnings.filterwarnings("ignore", message=_pattern)

__version__ = "0.1.0"
