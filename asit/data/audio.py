"""Decode an audio file into a mono float32 waveform at a chosen sample rate."""

from __future__ import annotations

import logging
import os

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

__all__ = ["AudioDecodeError", "load_audio"]

logger = logging.getLogger(__name__)


class AudioDecodeError(RuntimeError):
    """A clip could not be turned into a usable waveform.

    ``reason`` is a short, fixed category (``"unreadable"``, ``"empty"``, ``"non-finite"``)
    suitable for counting; ``detail`` says more. ``str(err)`` names the file.
    """

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(path, reason, detail)  # args kept so the error pickles across workers
        self.path = path
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: {self.reason}{extra}"


def load_audio(path: str | os.PathLike, sample_rate: int) -> torch.Tensor:
    """Decode ``path`` and return a float32 mono waveform of shape ``(T,)`` at ``sample_rate``.

    Channels are averaged; the signal is resampled with ``torchaudio.functional.resample``
    when the file's rate differs.

    Raises:
        AudioDecodeError: the file cannot be decoded, holds no samples, or holds NaN/Inf.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    name = os.fspath(path)
    try:
        data, file_rate = sf.read(name, dtype="float32", always_2d=True)  # [T, C]
    except Exception as exc:  # libsndfile raises several types; all mean "cannot decode"
        raise AudioDecodeError(name, "unreadable", f"{type(exc).__name__}: {exc}") from exc
    if data.size == 0:
        raise AudioDecodeError(name, "empty", "no audio samples")
    if not np.isfinite(data).all():
        raise AudioDecodeError(name, "non-finite", "NaN or Inf samples")

    wave = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1, dtype=np.float32)))  # [T]
    if file_rate != sample_rate:
        wave = AF.resample(wave, orig_freq=int(file_rate), new_freq=int(sample_rate))
    return wave.to(torch.float32).contiguous()
