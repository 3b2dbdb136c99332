"""Output decoders (the "Out" of MIMO): the LM's final-norm hidden states at a sample's K generation tokens are
projected (output projection, hidden → decoder dim) and decoded into an RGB image or a log-mel spectrogram, which
Griffin-Lim turns into a waveform. Pure tensor code, no Ray.

Shapes: ``N`` samples that ask for an output, ``K`` generation tokens per sample, ``H`` LM width.

    decoders = OutputDecoders(cfg.model)                       # only the enabled outputs
    rows = gather_generation_rows(hidden_SBH, input_ids_BS, decoders.token_ids)   # {name: [N*K, H]}
    losses = decoders.loss_sums(rows, batch["output_targets"])  # {name: weighted sum of per-sample losses}
    images = decoders.decode("image_out", rows["image_out"])   # [N, 3, S, S] in [0, 1]
    wave = decoders.waveform(decoders.decode("audio_out", rows["audio_out"]))   # [N, samples]
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mimo_ray.config import AudioOutputConfig, ImageOutputConfig, ModelConfig
from mimo_ray.media.audio_features import mel_filterbank

LOG_FLOOR = 1e-5


def gather_generation_rows(
    hidden_SBH: torch.Tensor, input_ids_BS: torch.Tensor, token_ids: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Hidden states at each output's generation tokens, batch-major (C2 order: sample 0's tokens, then sample 1's).

    Args:
        hidden_SBH: the LM's final-norm hidden states ``[S, B, H]``.
        input_ids_BS: ``[B, S]``.
        token_ids: ``{output name: generation token id}``.

    Returns:
        ``{name: [N_tokens, H]}`` for every output whose token occurs.
    """
    hidden_BSH = hidden_SBH.transpose(0, 1)
    out = {}
    for name, token in token_ids.items():
        mask = input_ids_BS == token
        if bool(mask.any()):
            out[name] = hidden_BSH[mask]
    return out


def samples_with_output(input_ids_BS: torch.Tensor, token_id: int, num_tokens: int, name: str) -> list[int]:
    """Per sample 1 if it asks for output ``name`` (exactly ``num_tokens`` generation tokens), else 0.

    Raises:
        ValueError: a sample holds a count other than 0 or ``num_tokens``, naming the output and the count.
    """
    counts = (input_ids_BS == token_id).sum(dim=1).tolist()
    bad = [c for c in counts if c not in (0, num_tokens)]
    if bad:
        raise ValueError(
            f"output {name!r}: a sample holds {bad[0]} generation tokens (id {token_id}); expected 0 or "
            f"model.outputs.{name}.num_tokens={num_tokens}"
        )
    return [1 if c else 0 for c in counts]


class ImageDecoder(nn.Module):
    """K conditioning vectors → 4x4 seed → (upsample x2, conv 3x3, GELU)* → conv → sigmoid RGB ``[3, S, S]``."""

    def __init__(self, hidden_size: int, cfg: ImageOutputConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.decoder_dim
        self.projection = nn.Linear(hidden_size, dim)
        self.seed = nn.Linear(cfg.num_tokens * dim, dim * 16)
        layers: list[nn.Module] = []
        channels = dim
        for _ in range(int(math.log2(cfg.image_size // 4))):
            out = max(channels // 2, 16)
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, out, 3, padding=1), nn.GELU()]
            channels = out
        self.upsampler = nn.Sequential(*layers)
        self.head = nn.Conv2d(channels, 3, 3, padding=1)

    def forward(self, cond_NKH: torch.Tensor) -> torch.Tensor:
        """``[N, K, H]`` → images ``[N, 3, S, S]`` in [0, 1]."""
        z = self.projection(cond_NKH).flatten(1)
        x = self.seed(z).view(z.shape[0], -1, 4, 4)
        return torch.sigmoid(self.head(self.upsampler(x)))

    def target(self, target: torch.Tensor) -> torch.Tensor:
        """Batch target (uint8 or float ``[N, 3, S, S]``) → float in [0, 1]."""
        return target.float() / 255.0 if target.dtype == torch.uint8 else target.float()


class MelSpectrogram(nn.Module):
    """Waveform ``[N, L]`` → log-mel ``[N, n_mels, T]`` (magnitude STFT, Hann window, centred, Slaney mel).

    Always fp32 (``keep_fp32``: the mixed-precision cast leaves it alone): it defines the targets and Griffin-Lim.
    """

    keep_fp32 = True

    def __init__(self, cfg: AudioOutputConfig):
        super().__init__()
        self.cfg = cfg
        fb = torch.from_numpy(mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels).copy())
        self.register_buffer("filterbank", fb, persistent=False)  # [n_mels, F]
        self.register_buffer("window", torch.hann_window(cfg.n_fft), persistent=False)

    def stft(self, wave_NL: torch.Tensor) -> torch.Tensor:
        return torch.stft(
            wave_NL, self.cfg.n_fft, self.cfg.hop_length, window=self.window, center=True, return_complex=True
        )

    def forward(self, wave_NL: torch.Tensor) -> torch.Tensor:
        mag = self.stft(wave_NL.float()).abs()  # [N, F, T]
        return torch.log(torch.clamp(self.filterbank @ mag, min=LOG_FLOOR))


def griffin_lim(
    logmel_NMT: torch.Tensor, mel: MelSpectrogram, num_iters: int, num_samples: int, seed: int = 0
) -> torch.Tensor:
    """Log-mel → waveform: pseudo-inverse of the mel filterbank, then Griffin-Lim phase recovery with momentum.

    Args:
        logmel_NMT: ``[N, n_mels, T]`` log-mel.
        mel: the transform that defined the mel (filterbank, window, hop).
        num_iters: Griffin-Lim iterations.
        num_samples: waveform length.
        seed: seed of the initial random phase.

    Returns:
        ``[N, num_samples]`` float waveform, peak-normalised to 0.9 where non-silent.
    """
    cfg = mel.cfg
    mag = torch.clamp(torch.linalg.pinv(mel.filterbank) @ torch.exp(logmel_NMT), min=0.0)  # [N, F, T]
    # Drawn on a CPU generator (the same phase on every device, so CPU and GPU runs agree), then moved to the input's
    # device: every later op runs where the magnitude lives.
    gen = torch.Generator().manual_seed(seed)
    phase = torch.rand(mag.shape, generator=gen).to(mag.device)
    angles = torch.exp(2j * math.pi * phase).to(torch.complex64)
    previous = torch.zeros_like(angles)
    wave = None
    for _ in range(num_iters):
        wave = torch.istft(mag * angles, cfg.n_fft, cfg.hop_length, window=mel.window, center=True, length=num_samples)
        rebuilt = mel.stft(wave)
        accelerated = rebuilt - 0.99 / (1 + 0.99) * previous
        previous = rebuilt
        angles = accelerated / accelerated.abs().clamp(min=1e-8)
    wave = torch.istft(mag * angles, cfg.n_fft, cfg.hop_length, window=mel.window, center=True, length=num_samples)
    peak = wave.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)
    return wave * 0.9 / peak


class AudioDecoder(nn.Module):
    """K conditioning vectors → MLP → log-mel ``[n_mels, T]``; Griffin-Lim gives the waveform."""

    def __init__(self, hidden_size: int, cfg: AudioOutputConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.decoder_dim
        self.projection = nn.Linear(hidden_size, dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.num_tokens * dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, cfg.n_mels * cfg.num_frames)
        )
        self.mel = MelSpectrogram(cfg)

    def forward(self, cond_NKH: torch.Tensor) -> torch.Tensor:
        """``[N, K, H]`` → log-mel ``[N, n_mels, T]``."""
        z = self.projection(cond_NKH).flatten(1)
        return self.mlp(z).view(z.shape[0], self.cfg.n_mels, self.cfg.num_frames)

    def target(self, target: torch.Tensor) -> torch.Tensor:
        """Batch target waveform ``[N, L]`` → log-mel ``[N, n_mels, T]``."""
        return self.mel(target)

    def waveform(self, logmel_NMT: torch.Tensor) -> torch.Tensor:
        """Generated log-mel → ``[N, samples]`` waveform (Griffin-Lim)."""
        return griffin_lim(logmel_NMT.detach().float(), self.mel, self.cfg.griffin_lim_iters, self.cfg.num_samples)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``[N, ...]`` → ``[N]`` mean L1 or MSE per sample."""
    diff = pred - target
    err = diff.abs() if kind == "l1" else diff * diff
    return err.flatten(1).mean(dim=1)


class OutputDecoders(nn.Module):
    """The enabled output decoders of ``model.outputs`` (an empty module when none is enabled).

    Args:
        model_cfg: ``cfg.model``.
    """

    def __init__(self, model_cfg: ModelConfig):
        super().__init__()
        self.specs = model_cfg.outputs.active()
        hidden = model_cfg.lm.hidden_size
        self.decoders = nn.ModuleDict()
        for name, spec in self.specs.items():
            cls = ImageDecoder if name == "image_out" else AudioDecoder
            self.decoders[name] = cls(hidden, spec)

    @property
    def token_ids(self) -> dict[str, int]:
        """``{output name: generation token id}``."""
        return {name: spec.token_id for name, spec in self.specs.items()}

    def decode(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """``[N*K, H]`` generation rows → that output's prediction (images ``[N,3,S,S]`` / log-mel ``[N,M,T]``)."""
        k = self.specs[name].num_tokens
        if rows.shape[0] % k:
            raise ValueError(f"output {name!r}: {rows.shape[0]} generation rows are not a multiple of K={k}")
        return self.decoders[name](rows.view(rows.shape[0] // k, k, rows.shape[-1]))

    def waveform(self, logmel_NMT: torch.Tensor) -> torch.Tensor:
        """Generated log-mel → waveform ``[N, samples]``."""
        return self.decoders["audio_out"].waveform(logmel_NMT)

    def loss_sums(self, rows: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted sum over samples of each output's per-sample loss (L1/MSE on pixels or log-mel).

        Args:
            rows: ``{name: [N*K, H]}`` from :func:`gather_generation_rows`.
            targets: ``{name: [N, ...]}`` (images ``[N,3,S,S]`` uint8/float, waveforms ``[N, L]``), batch-major.

        Returns:
            ``{name: scalar}`` = ``loss_weight * sum_n loss_n`` for every output that has rows.

        Raises:
            ValueError: rows without targets or a count mismatch, naming the output and both counts.
        """
        out = {}
        for name, spec in self.specs.items():
            if name not in rows:
                continue
            have = 0 if targets.get(name) is None else int(targets[name].shape[0])
            want = rows[name].shape[0] // spec.num_tokens
            if have != want:
                raise ValueError(f"output {name!r}: {want} samples hold generation tokens but {have} targets given")
            decoder = self.decoders[name]
            pred = self.decode(name, rows[name])
            target = decoder.target(targets[name].to(pred.device))
            out[name] = spec.loss_weight * per_sample_loss(pred, target, spec.loss).sum()
        return out
