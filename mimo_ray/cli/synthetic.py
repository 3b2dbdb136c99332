"""The synthetic data maker ``datasets/make_synthetic.py`` loaded by path, once per process.

``datasets/`` is deliberately not a package (it would shadow Hugging Face ``datasets``); the demo, the benchmarks and
the tests make their clips with it through :func:`load_synthetic_module`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: The maker in a source checkout (``datasets/`` sits beside ``mimo_ray/``).
MAKE_SYNTHETIC = Path(__file__).resolve().parents[2] / "datasets" / "make_synthetic.py"
_NAME = "mimo_ray_datasets_make_synthetic"


def load_synthetic_module() -> ModuleType:
    """``datasets/make_synthetic.py`` as a module (``make_synthetic``, ``COLOURS``, ``NOTES``, ...).

    Raises:
        ImportError: naming the file when it is missing (an installed wheel has no ``datasets/``).
    """
    if _NAME not in sys.modules:
        spec = importlib.util.spec_from_file_location(_NAME, MAKE_SYNTHETIC)
        if spec is None or spec.loader is None or not MAKE_SYNTHETIC.is_file():
            raise ImportError(f"cannot load {MAKE_SYNTHETIC}: the synthetic data maker comes with a source checkout")
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module  # dataclasses look their module up while the file executes
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[_NAME]
            raise
    return sys.modules[_NAME]
