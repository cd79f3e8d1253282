"""Random waveform augmentations used to make the pretraining views."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pad_or_crop_random", "random_roll"]


def pad_or_crop_random(wave: torch.Tensor, length: int, generator: torch.Generator | None) -> torch.Tensor:
    """Return exactly ``length`` samples of ``wave`` ``(T,)``.

    Shorter input is zero-padded at the end; longer input gives a window of ``length`` samples
    starting at a uniformly random offset. This is what the ASiT code calls
    ``RandomResizedCrop``: a plain crop, with no change of length or resampling.
    """
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D (T,), got shape {tuple(wave.shape)}")
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    total = wave.shape[0]
    if total <= length:
        return F.pad(wave, (0, length - total))
    start = int(torch.randint(0, total - length + 1, (1,), generator=generator).item())
    return wave[start : start + length]


def random_roll(wave: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """With probability ``p``, shift ``wave`` ``(T,)`` circularly by a uniform random number of samples."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    total = wave.shape[-1]
    # Always draw both numbers so the generator advances the same way whatever the outcome.
    apply = torch.rand((1,), generator=generator).item() < p
    shift = int(torch.randint(0, max(total, 1), (1,), generator=generator).item())
    if not apply or total == 0:
        return wave
    return torch.roll(wave, shifts=shift, dims=-1)
