"""Float comparisons that hold on any machine of our kind.

Floats computed in different processes, with different thread counts or on other CPU models (AVX2 vs AVX-512 GEMM
blocking) may differ in the last bits, so no test compares such floats for equality. The bounds below are the oracle
strengths the project promises (fp32 losses <= 1e-6 relative, gradients <= 1e-5 relative) and sit one to two orders
of magnitude above the spread measured with different ``torch_num_threads`` and process layouts.

Parameters after optimizer steps are compared with an absolute-plus-relative bound: AdamW divides by sqrt(v), so a
last-bit difference of a near-zero gradient can move a parameter by up to ``lr`` in either direction — a relative
bound on a small parameter would blow up on that, an absolute one scaled by ``lr`` does not.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """max |a - b| / max |b| (the plain difference when ``b`` is all zero)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale else diff


def bound_ratio(a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> float:
    """max over elements of |a - b| / (atol + rtol |b|): <= 1 means within the bound."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a - b).abs() / (atol + rtol * b.abs())).max()) if b.numel() else 0.0


def params_ratio(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], lr: float, steps: int) -> float:
    """Worst :func:`bound_ratio` over parameters after ``steps`` AdamW steps at learning rate ``lr``.

    Bound: ``rtol = 1e-5`` plus ``atol = 0.25 * lr * steps`` (a quarter of the largest move one AdamW step can make).
    """
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(bound_ratio(got[k], ref[k], rtol=1e-5, atol=0.25 * lr * steps) for k in ref)


def max_rel(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> float:
    """Worst :func:`rel` over the entries of two dicts with the same keys."""
    assert set(got) == set(ref), sorted(set(got) ^ set(ref))
    return max(rel(got[k], ref[k]) for k in ref)
