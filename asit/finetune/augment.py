"""Training-time augmentation of fine-tuning batches (AST's recipe), applied on the device per batch.

:func:`sample_mixup` draws a plan (per clip ``λ ~ Beta(α, α)`` with some probability, and a partner clip
of the batch) and :func:`apply_mixup` mixes waveforms and targets with the same ``λ``; :class:`SpecAugment`
masks one frequency band and one time band per clip of the normalised fbank; :func:`add_noise_and_shift`
is AST's speech-commands noise and ±10-frame roll. Every function draws from the generator it is given
(or torch's global one), so a resumed run that restores those states repeats the same augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torchaudio.transforms as TT

__all__ = ["SpecAugment", "add_noise_and_shift", "apply_mixup", "sample_mixup"]


def sample_mixup(
    batch: int, alpha: float, prob: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw a mixup plan: per clip ``λ`` (``Beta(α, α)`` with probability ``prob``, else 1) and a
    partner, another clip of the batch (a random cyclic derangement; itself only when ``batch == 1``).

    Returns:
        ``(lam [B] float32, partner [B] int64)`` on the CPU.
    """
    perm = rng.permutation(batch)
    partner = np.empty(batch, dtype=np.int64)
    partner[perm] = np.roll(perm, -1)
    mixed = rng.random(batch) < prob
    lam = np.where(mixed, rng.beta(alpha, alpha, size=batch), 1.0)
    return torch.from_numpy(lam.astype(np.float32)), torch.from_numpy(partner)


def apply_mixup(
    x: torch.Tensor, y: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = λ x + (1 - λ) x[partner]`` and ``y' = λ y + (1 - λ) y[partner]`` with the same ``λ``.

    Args:
        x: ``[B, ...]`` inputs (waveforms ``[B, S]`` here). y: ``[B, K]`` (multi-/one-hot) targets.
        lam: ``[B]``; partner: ``[B]`` indices into the batch.
    """
    lam = lam.to(x.device, x.dtype)
    partner = partner.to(x.device)
    lx = lam.view(-1, *([1] * (x.dim() - 1)))
    ly = lam.to(y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return lx * x + (1 - lx) * x[partner], ly * y + (1 - ly) * y[partner]


class SpecAugment(nn.Module):
    """Frequency then time masking of ``[B, C, T, F]`` spectrograms, independent per clip.

    ``torchaudio.transforms.FrequencyMasking(freqm)`` / ``TimeMasking(timem)`` with ``iid_masks``:
    one band per axis and clip, of width uniform in ``[0, width)``, filled with 0.
    """

    def __init__(self, freqm: int, timem: int) -> None:
        super().__init__()
        self.freq = TT.FrequencyMasking(freqm, iid_masks=True) if freqm > 0 else None
        self.time = TT.TimeMasking(timem, iid_masks=True) if timem > 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, T, F], got shape {tuple(x.shape)}")
        x = x.transpose(-1, -2)  # torchaudio wants (..., freq, time)
        if self.freq is not None:
            x = self.freq(x)
        if self.time is not None:
            x = self.time(x)
        return x.transpose(-1, -2)


def add_noise_and_shift(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """AST's speech-commands augmentation: ``x + U(0,1) · u / 10`` (``u ~ U(0,1)`` per clip), then a
    circular time shift by an integer in ``[-10, 10)`` frames per clip. ``x``: ``[B, C, T, F]``."""
    B = x.shape[0]
    scale = torch.rand(B, 1, 1, 1, device=x.device, generator=generator) / 10
    x = x + torch.rand(x.shape, device=x.device, generator=generator) * scale
    shifts = torch.randint(-10, 10, (B,), generator=generator).tolist()
    return torch.stack([torch.roll(x[b], shifts[b], dims=-2) for b in range(B)])
