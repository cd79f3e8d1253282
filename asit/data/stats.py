"""Mean and standard deviation of a corpus's fbank values: the ``data.mean``/``data.std`` of a config.

The statistics are those of the raw log-mel values (before ``normalize_fbank``) over every frame
of every decodable clip, resampled to the pipeline's rate and with the clip's mean removed, as
:func:`asit.data.kaldi_fbank` computes them (no cropping, no padding). AST's AudioSet numbers
(mean -4.2677393, std 4.5689974) were measured the same way on its 10 s clips.

Clips are reduced to ``(count, mean, M2)`` in float64 and merged with Chan's parallel update,
so the result does not lose precision over millions of clips and does not depend on the order.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .audio import AudioDecodeError, load_audio
from .fbank import batched_kaldi_fbank
from .manifest import AudioEntry

__all__ = ["FbankStats", "RunningStats", "compute_fbank_stats", "summarize"]

logger = logging.getLogger(__name__)


class RunningStats:
    """Streaming mean and (population) variance of many values, merged per chunk in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def merge(self, count: int, mean: float, m2: float) -> None:
        """Add a chunk summarised as ``(count, mean, M2)`` (Chan et al.'s pairwise update)."""
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total

    def update(self, values: torch.Tensor) -> None:
        """Add every element of ``values``."""
        count, mean, m2 = summarize(values)
        self.merge(count, mean, m2)

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else float("nan")


def summarize(values: torch.Tensor) -> tuple[int, float, float]:
    """``(count, mean, M2)`` of all elements, computed in float64."""
    v = values.detach().reshape(-1).to(torch.float64)
    if v.numel() == 0:
        return 0, 0.0, 0.0
    mean = v.mean()
    return v.numel(), float(mean), float(((v - mean) ** 2).sum())


@dataclass
class FbankStats:
    """Result of :func:`compute_fbank_stats`."""

    mean: float
    std: float
    clips: int  # clips that contributed
    frames: int  # fbank frames that contributed
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> number of clips
    skipped_files: list[str] = field(default_factory=list)  # "path: reason (detail)" of each, in manifest order

    def yaml_snippet(self, sample_rate: int | None = None, num_mel_bins: int | None = None) -> str:
        """A config fragment: ``data: {mean, std}`` with comments on where it came from and how to use it
        (as overrides: the fragment alone is not a recipe, every other key would take its default)."""
        skipped = sum(self.skipped.values())
        setting = f" at {sample_rate} Hz, {num_mel_bins} mel bins" if sample_rate and num_mel_bins else ""
        return (
            f"# fbank statistics of {self.clips} clips ({self.frames} frames){setting}; {skipped} skipped\n"
            f"# use as overrides on your recipe: --config <recipe> {self.overrides()}\n"
            f"# (not as --config of this file: every other key would take its default)\n"
            f"data:\n  mean: {self.mean:.7f}\n  std: {self.std:.7f}\n"
        )

    def overrides(self) -> str:
        """The same as command-line overrides: ``data.mean=... data.std=...``."""
        return f"data.mean={self.mean:.7f} data.std={self.std:.7f}"


class _ClipSummaries(Dataset):
    """Per clip: ``(count, mean, M2, frames, "", "")`` of its fbank, or ``(0, 0, 0, 0, reason, message)``
    (the message names the file)."""

    def __init__(self, entries: Sequence[AudioEntry], sample_rate: int, num_mel_bins: int) -> None:
        self.entries = entries
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[int, float, float, int, str, str]:
        path = self.entries[index].path
        try:
            wave = load_audio(path, self.sample_rate)
        except AudioDecodeError as err:
            logger.warning("skipping %s", err)
            return 0, 0.0, 0.0, 0, err.reason, str(err)
        fbank = batched_kaldi_fbank(wave, self.sample_rate, self.num_mel_bins, target_frames=None)  # [T, F]
        if not torch.isfinite(fbank).all():
            logger.warning("skipping %s: non-finite fbank", path)
            return 0, 0.0, 0.0, 0, "non-finite", f"{path}: non-finite (fbank)"
        count, mean, m2 = summarize(fbank)
        return count, mean, m2, fbank.shape[0], "", ""


def compute_fbank_stats(
    entries: Sequence[AudioEntry],
    *,
    sample_rate: int = 32000,
    num_mel_bins: int = 128,
    max_clips: int | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> FbankStats:
    """Mean and standard deviation of the fbank values of ``entries`` (the first ``max_clips``).

    Undecodable clips are skipped, counted by reason and named (``skipped_files``). ``num_workers`` decode in parallel
    (a ``DataLoader``); ``progress`` shows a tqdm bar. The result does not depend on
    ``num_workers``.

    Raises:
        ValueError: no clip could be used.
    """
    if max_clips is not None:
        if max_clips < 1:
            raise ValueError(f"max_clips must be positive, got {max_clips}")
        entries = entries[:max_clips]
    if not entries:
        raise ValueError("no clips to compute statistics over")
    loader = DataLoader(
        _ClipSummaries(entries, sample_rate, num_mel_bins),
        batch_size=None,  # one clip at a time; summaries are tiny
        num_workers=num_workers,
    )
    running = RunningStats()
    frames = clips = 0
    skipped: Counter[str] = Counter()
    skipped_files: list[str] = []
    for count, mean, m2, clip_frames, reason, message in tqdm(loader, total=len(entries), disable=not progress,
                                                              desc="fbank stats", unit="clip"):
        if reason:
            skipped[reason] += 1
            skipped_files.append(message)
            continue
        running.merge(int(count), float(mean), float(m2))
        frames += int(clip_frames)
        clips += 1
    if clips == 0:
        shown = "; ".join(skipped_files[:5]) + ("; ..." if len(skipped_files) > 5 else "")
        raise ValueError(f"none of the {len(entries)} clips could be decoded ({dict(skipped)}): {shown}")
    return FbankStats(running.mean, running.std, clips, frames, dict(skipped), skipped_files)
