"""mimo_ray: Megatron MIMO (multimodal in / multimodal out) models trained and served disaggregated on Ray."""

import warnings as _warnings

from mimo_ray import _lazy_compile

# megatron-core warns at import that TE/Apex are missing and that MIMO is experimental; on CPU both are expected.
# Set here so every process that imports any part of mimo_ray (driver, actors, Ray Data workers) is quiet.
for _pattern in (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*experimental and still under active development.*",
    ".*full scope is deprecated.*",
):
    _warnings.filterwarnings("ignore", message=_pattern)

# megatron-core's fusion kernels (off in mimo_ray) are torch.compile'd at import; defer that to their first call.
_lazy_compile.install()

__version__ = "0.1.0"

#: The public API (DESIGN.md C13), defined in :mod:`mimo_ray.api` and loaded on first use, so that Ray workers
#: importing internal modules never pay for it. Everything not listed here is internal and may change.
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


def __getattr__(name: str):  # noqa: ANN202 - PEP 562 lazy export
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("mimo_ray.api"), name)
    raise AttributeError(f"module 'mimo_ray' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
