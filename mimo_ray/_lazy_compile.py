"""Importing megatron-core without paying for torch.compile until a compiled function runs.

``megatron.core.jit.jit_fuser`` is ``torch.compile``, and megatron-core decorates its fusion kernels with it at import
time (``megatron.core.fusions.*``). Decorating alone imports ``torch._dynamo`` and ``torch._inductor``: about 1.5 s of
the ~3.7 s that ``import megatron.core`` costs on our CPU machines (measured with ``python -X importtime``), paid by
every Ray actor and worker process that builds a stage. mimo_ray turns those fusions off (``*_fusion=False`` in
:mod:`mimo_ray.model.layers`), so the kernels never run.

:func:`install` adds a one-shot import hook: while ``megatron.core`` itself executes (its ``__init__`` imports the
fusion modules), ``torch.compile`` is replaced by a lazy decorator that calls the real ``torch.compile`` with the same
arguments on the function's first call. Behaviour is unchanged: a fused kernel that is used is compiled exactly as
before, only later; nothing else sees the replacement (it is restored when the import finishes, also on error).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.machinery
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

_TARGET = "megatron.core"
_lock = threading.Lock()


def _lazy_compile(real: Callable[..., Any]) -> Callable[..., Any]:
    """A ``torch.compile`` look-alike that defers ``real(fn, **kwargs)`` to the first call of the result."""

    def compile_later(model: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
        if model is None:  # used as @torch.compile(...) with arguments
            return lambda fn: compile_later(fn, **kwargs)
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def call(*args: Any, **kw: Any) -> Any:
            if not compiled:
                with _lock:
                    if not compiled:
                        compiled.append(real(model, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return compile_later


@contextlib.contextmanager
def deferred_torch_compile() -> Iterator[None]:
    """Within the block, ``torch.compile(fn, ...)`` returns ``fn`` wrapped to compile on its first call."""
    import torch

    real = torch.compile
    torch.compile = _lazy_compile(real)
    try:
        yield
    finally:
        torch.compile = real


class _DeferringLoader(importlib.abc.Loader):
    """Wraps the loader of ``megatron.core`` so that its module body runs under :func:`deferred_torch_compile`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with deferred_torch_compile():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ... of the real loader
        return getattr(self._loader, name)


class _MegatronFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that only answers for ``megatron.core`` (once) and then removes itself."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _DeferringLoader(spec.loader)
        return spec


def install() -> None:
    """Add the hook unless ``megatron.core`` is already imported (or the hook is already in place)."""
    if _TARGET in sys.modules or any(isinstance(f, _MegatronFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _MegatronFinder())
