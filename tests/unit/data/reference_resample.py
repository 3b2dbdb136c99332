"""The hand-written polyphase resampler mimo_ray used before soxr, kept as the reference its tests compare with."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

#: Zero crossings of the sinc kept on each side of a tap centre (filter half-length, in the narrower rate).
_ZERO_CROSSINGS = 32
#: Kaiser window shape; 9.0 puts the sidelobes below -85 dB.
_KAISER_BETA = 9.0
#: Cutoff as a fraction of the lower Nyquist frequency, so the transition band ends near Nyquist and
#: content above the new Nyquist cannot alias back.
_ROLLOFF = 0.92


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resamples a mono signal with a Kaiser-windowed sinc low-pass (anti-aliasing) filter.

    The rate ratio is reduced to ``up/down``; each output sample is a dot product of the nearby input samples
    with one of ``up`` precomputed filter phases (one matrix product over all outputs). The pass band is flat
    (±0.02 dB) to 0.85 of the lower Nyquist frequency; content above the lower Nyquist frequency is suppressed
    by more than 80 dB.

    Args:
        wave: float ``[N]`` signal at ``orig_sr``.
        orig_sr: Input sample rate in Hz.
        target_sr: Output sample rate in Hz.

    Returns:
        float32 ``[ceil(N * target_sr / orig_sr)]``; sample ``n`` lies at time ``n / target_sr``, aligned with
        input sample 0.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"resample expects a mono [N] signal, got shape {wave.shape}")
    if orig_sr == target_sr or wave.size == 0:
        return wave.copy()
    g = math.gcd(int(orig_sr), int(target_sr))
    up, down = int(target_sr) // g, int(orig_sr) // g
    block_filter, half = _block_filter(up, down)
    num_out = -(-wave.size * up // down)
    num_blocks = -(-num_out // up)
    span = block_filter.shape[0]
    # Zero padding: taps before the start or past the end read silence, not wrapped or reflected samples.
    padded = np.zeros(num_blocks * down + span, dtype=np.float32)
    padded[half : half + wave.size] = wave
    # Block m holds outputs m*up ... m*up + up - 1, which all read padded[m*down : m*down + span]; one GEMM
    # over these overlapping windows computes every output.
    windows = np.lib.stride_tricks.sliding_window_view(padded, span)[::down][:num_blocks]
    return (windows @ block_filter).reshape(-1)[:num_out]


@lru_cache(maxsize=16)
def _block_filter(up: int, down: int) -> tuple[np.ndarray, int]:
    """Builds the filter matrix for an ``up/down`` rate change.

    Returns:
        (float32 ``[span, up]`` matrix ``F``, ``half``). For output ``n = m*up + p`` at input position
        ``t = n*down/up``, ``F[:, p]`` weighs the ``span`` zero-padded input samples starting at input sample
        ``m*down - half``; only the ``2*half`` taps around ``t`` are non-zero.
    """
    # Cutoff in cycles per input sample: below both the input and the output Nyquist frequency.
    cutoff = 0.5 * min(1.0, up / down) * _ROLLOFF
    half = math.ceil(_ZERO_CROSSINGS / (2.0 * cutoff))
    span = down + 2 * half
    phases = np.arange(up)
    position = phases * down / up  # output instant relative to input sample m*down
    taps = np.arange(span)[:, None] - half  # input sample index relative to m*down
    dist = position[None, :] - taps
    inside = np.abs(dist) < half
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, None))) / np.i0(_KAISER_BETA)
    weights = np.where(inside, 2.0 * cutoff * np.sinc(2.0 * cutoff * dist) * window, 0.0)
    return weights.astype(np.float32), half
