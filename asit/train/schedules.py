"""Training schedules as precomputed per-iteration arrays (indexed by the global step).

Indexing by the global step makes exact resume trivial: the step counter is the whole state.
"""

from __future__ import annotations

import numpy as np

__all__ = ["cosine_schedule", "teacher_temp_schedule"]


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up from ``warmup_start`` to ``base`` over ``warmup_epochs``, then a cosine from
    ``base`` to ``final``. Returns ``epochs * iters_per_epoch`` float64 values; the last equals
    ``final`` (and the first after warm-up equals ``base``)."""
    if epochs <= 0 or iters_per_epoch <= 0:
        raise ValueError(f"epochs and iters_per_epoch must be > 0, got {epochs}, {iters_per_epoch}")
    total = epochs * iters_per_epoch
    warm = min(warmup_epochs * iters_per_epoch, total)
    warmup = np.linspace(warmup_start, base, warm, endpoint=False) if warm > 0 else np.array([])
    rest = total - warm
    if rest == 1:
        cosine = np.array([final], dtype=np.float64)
    else:
        t = np.arange(rest) / max(rest - 1, 1)
        cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int,
                          iters_per_epoch: int) -> np.ndarray:
    """Teacher temperature per iteration: linear ``warmup_temp → temp`` over ``warmup_epochs``
    epochs (one value per epoch, as DINO/ASiT do), then constant.

    A run shorter than the warm-up sees the first ``epochs`` values of the same ramp (it does not
    reach ``temp``), so a short run's schedule is a prefix of a longer run's."""
    if epochs <= 0 or iters_per_epoch <= 0 or warmup_epochs < 0:
        raise ValueError(f"need epochs > 0, iters_per_epoch > 0, warmup_epochs >= 0; got {epochs}, "
                         f"{iters_per_epoch}, {warmup_epochs}")
    ramp = np.linspace(warmup_temp, temp, warmup_epochs)
    per_epoch = np.concatenate([ramp, np.full(max(epochs - warmup_epochs, 0), temp)])[:epochs]
    return np.repeat(per_epoch, iters_per_epoch).astype(np.float64)
