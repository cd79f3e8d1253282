"""Fine-tuning data: labelled clips as fixed-length waveform windows, their batches and their sampling.

:class:`LabelledClips` serves a random window of a training clip (keyed on seed, epoch, clip and repeat,
so a resumed run crops the same) and the first window, or every window, of an evaluation clip; clips that
cannot be decoded are dropped by :func:`collate_clips`. :func:`balanced_sample_weights` gives AudioSet-style
weights for :class:`asit.data.samplers.WeightedDistributedSampler`, a weighted draw with replacement split
across DDP ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from asit.data import AudioDecodeError, AudioEntry, load_audio

from .config import FTDataConfig

__all__ = ["LabelledClips", "balanced_sample_weights", "collate_clips"]

log = logging.getLogger(__name__)


def balanced_sample_weights(targets: np.ndarray) -> np.ndarray:
    """AudioSet-style sampling weight per clip: ``sum over its labels of 1 / count(label)``.

    Args:
        targets: ``[N, K]`` 0/1 multi-hot labels.

    Returns:
        ``[N]`` float64 weights (0 for a clip without labels: it is never drawn). AST uses
        ``sum 1000 / (count + 0.01)``: the same up to a constant factor and the smoothing.
    """
    targets = np.asarray(targets, dtype=np.float64)
    counts = targets.sum(0)  # [K]
    inverse = np.divide(1.0, counts, out=np.zeros_like(counts), where=counts > 0)
    return targets @ inverse


class LabelledClips(Dataset):
    """Clips with their target vectors; each item is a fixed-length waveform window.

    Training items are a random window of ``num_samples`` samples, drawn from a generator keyed on
    ``(seed, epoch, i)`` (``set_epoch``) and, for the ``r``-th repeat (``r > 0``) of a clip in one epoch
    of a sampler with replacement (the item key ``(i, r)``), on ``r`` too, so repeats get other crops.
    Evaluation items are the first window or, with ``all_windows=True``, ``W = ceil(L / S)`` windows
    stacked as ``wave [W, S]`` (their scores are averaged by the evaluation): consecutive from the
    start, except the last, which ends at the clip's end and so overlaps the one before it; every
    window is full of audio. Clips shorter than a window are zero-padded (one window). A clip that
    cannot be decoded gives ``None`` (dropped by :func:`collate_clips`).
    """

    def __init__(
        self, entries: Sequence[AudioEntry], targets: np.ndarray, *, sample_rate: int, num_samples: int,
        train: bool, seed: int = 0, all_windows: bool = False,
    ) -> None:
        self.entries = list(entries)
        self.targets = torch.as_tensor(targets, dtype=torch.float32)  # [N, K]
        self.sample_rate, self.num_samples, self.train, self.seed = sample_rate, num_samples, train, seed
        self.all_windows = all_windows and not train
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        i, repeat = key if isinstance(key, tuple) else (key, 0)
        entry = self.entries[i]
        try:
            wave = load_audio(entry.path, self.sample_rate)
        except AudioDecodeError as err:
            log.warning("skipping %s", err)
            return None
        n = self.num_samples
        if self.all_windows:
            if wave.numel() <= n:
                windows = F.pad(wave, (0, n - wave.numel())).unsqueeze(0)  # [1, S]
            else:  # the last window ends at the clip's end, overlapping the one before
                starts = [*range(0, wave.numel() - n, n), wave.numel() - n]
                windows = torch.stack([wave[s : s + n] for s in starts])  # [W, S]
            return {"wave": windows, "target": self.targets[i], "index": i}
        if wave.numel() > n:
            start = 0
            if self.train:
                rng = np.random.default_rng([self.seed, self.epoch, i, *([repeat] if repeat else [])])
                start = int(rng.integers(0, wave.numel() - n + 1))
            wave = wave[start : start + n]
        elif wave.numel() < n:
            wave = F.pad(wave, (0, n - wave.numel()))
        return {"wave": wave, "target": self.targets[i], "index": i}


def collate_clips(items: list[dict[str, Any] | None]) -> dict[str, torch.Tensor]:
    """Stack the decodable items: ``wave [B, S]``, ``target [B, K]``, ``index [B]``. Items holding
    several windows (``wave [W_i, S]``) are concatenated into ``wave [ΣW_i, S]`` with ``owner``
    giving each window's position in the batch."""
    items = [x for x in items if x is not None]
    if not items:
        return {"wave": torch.empty(0, 0), "target": torch.empty(0, 0), "index": torch.empty(0, dtype=torch.long)}
    batch = {"target": torch.stack([x["target"] for x in items]), "index": torch.tensor([x["index"] for x in items])}
    if items[0]["wave"].dim() == 2:
        batch["wave"] = torch.cat([x["wave"] for x in items])
        batch["owner"] = torch.cat([torch.full((x["wave"].shape[0],), b) for b, x in enumerate(items)])
    else:
        batch["wave"] = torch.stack([x["wave"] for x in items])
    return batch


def _resolve_manifest(source: str, d: FTDataConfig, seed: int) -> str:
    if source != "demo":
        return source
    from asit.data import ensure_demo_dataset

    root = Path(d.cache_dir) / "demo" if d.cache_dir else None
    return str(ensure_demo_dataset(root, num_clips=d.demo_clips, seconds=d.demo_seconds, seed=seed))
