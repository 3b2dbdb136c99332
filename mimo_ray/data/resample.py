"""Band-limited sample-rate conversion (libsoxr through the ``soxr`` package)."""

from __future__ import annotations

import numpy as np
import soxr

#: libsoxr's "very high quality" recipe: linear phase (no delay), pass band flat to ~0.91 of the lower Nyquist
#: frequency, stop band below -150 dB (32-bit precision).
_QUALITY = "VHQ"


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resamples a mono signal with libsoxr's linear-phase anti-aliasing filter.

    Replaces the hand-written Kaiser-windowed sinc polyphase filter this module used to hold; on band-limited
    signals the two agree to ≤ 1e-5 away from the ends (``tests/unit/data/test_media_audio.py``).

    Args:
        wave: float ``[N]`` signal at ``orig_sr``.
        orig_sr: Input sample rate in Hz.
        target_sr: Output sample rate in Hz.

    Returns:
        float32 ``[ceil(N * target_sr / orig_sr)]``; sample ``n`` lies at time ``n / target_sr``, aligned with
        input sample 0 (zero delay).

    Raises:
        ValueError: a rate is not positive or ``wave`` is not one-dimensional.
    """
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(f"resample expects a mono [N] signal, got shape {wave.shape}")
    if orig_sr == target_sr or wave.size == 0:
        return wave.copy()
    num_out = -(-wave.size * int(target_sr) // int(orig_sr))
    out = np.asarray(soxr.resample(wave, int(orig_sr), int(target_sr), quality=_QUALITY), dtype=np.float32)
    # soxr rounds the length to the nearest sample; keep this module's ceil contract (pad with silence).
    if out.size < num_out:
        out = np.concatenate([out, np.zeros(num_out - out.size, np.float32)])
    return out[:num_out]
