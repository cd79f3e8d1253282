"""Decode an audio file into a mono float32 waveform at a chosen sample rate."""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from fractions import Fraction

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as T

__all__ = ["MAX_SECONDS", "AudioDecodeError", "decode_audio_bytes", "load_audio"]

logger = logging.getLogger(__name__)


# Limits that keep a damaged or hostile header from costing unbounded memory or time.
MIN_FILE_RATE = 1000  # Hz; below this a header is taken as damaged
MAX_FILE_RATE = 1_000_000
MAX_SECONDS = 3600.0  # default cap on a clip's duration (checked on the header, before reading)
MAX_ABS_SAMPLE = 1e6  # larger float samples would overflow the float32 power spectrum
# torchaudio's sinc resampler builds a [new, orig + 2·width] kernel for the reduced ratio
# orig/new; past this size the ratio is approximated (relative error below 1e-5).
_MAX_RESAMPLE_KERNEL = 4_000_000


class AudioDecodeError(RuntimeError):
    """A clip could not be turned into a usable waveform.

    ``reason`` is a short, fixed category suitable for counting: ``"missing"`` (no such file),
    ``"unreadable"`` (not decodable), ``"empty"`` (no samples), ``"non-finite"`` (NaN/Inf samples),
    ``"out-of-range"`` (float samples beyond ±1e6), ``"bad-sample-rate"``, ``"too-long"``;
    ``detail`` says more. ``str(err)`` names the file.
    """

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(path, reason, detail)  # args kept so the error pickles across workers
        self.path = path
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: {self.reason}{extra}"


def _read(name: str, max_seconds: float | None, source: io.BytesIO | None = None) -> tuple[np.ndarray, int]:
    """``(samples [T, C] float32, file rate)`` of ``source`` (default: the file ``name``);
    header checks come before any large allocation."""
    try:
        with sf.SoundFile(name if source is None else source) as handle:
            rate, channels, frames = int(handle.samplerate), int(handle.channels), int(handle.frames)
            if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
                raise AudioDecodeError(name, "bad-sample-rate", f"{rate} Hz in the header")
            if channels < 1:
                raise AudioDecodeError(name, "unreadable", f"{channels} channels in the header")
            if max_seconds is not None and frames > max_seconds * rate:
                raise AudioDecodeError(name, "too-long", f"{frames / rate:.0f} s > {max_seconds:.0f} s")
            data = handle.read(dtype="float32", always_2d=True)  # [T, C]
    except AudioDecodeError:
        raise
    except Exception as exc:  # libsndfile raises several types; all mean "cannot decode"
        raise AudioDecodeError(name, "unreadable", f"{type(exc).__name__}: {exc}") from exc
    return data, rate


def _resample(wave: torch.Tensor, orig: int, new: int) -> torch.Tensor:
    ratio = Fraction(new, orig)
    if ratio.numerator * ratio.denominator > _MAX_RESAMPLE_KERNEL:
        # An unusual rate (e.g. 44056 Hz) with a huge reduced ratio: use a close one whose kernel
        # fits (numerator · denominator ≈ denominator² · ratio ≤ the limit).
        approx = ratio.limit_denominator(max(1, math.isqrt(int(_MAX_RESAMPLE_KERNEL / ratio))))
        logger.debug("resampling %d -> %d Hz approximated as %s", orig, new, approx)
        ratio = approx
    return _resampler(ratio.denominator, ratio.numerator)(wave)


@functools.lru_cache(maxsize=16)
def _resampler(orig: int, new: int) -> T.Resample:
    """torchaudio's sinc resampler with its kernel built once per rate pair (saves ~7 ms a clip)."""
    return T.Resample(orig_freq=orig, new_freq=new)


def load_audio(
    path: str | os.PathLike, sample_rate: int, *, max_seconds: float | None = MAX_SECONDS
) -> torch.Tensor:
    """Decode ``path`` and return a float32 mono waveform of shape ``(T,)`` at ``sample_rate``.

    Channels are averaged; the signal is resampled with torchaudio's sinc resampler (its
    kernel cached per rate pair) when the file's rate differs. Any format libsndfile reads
    works (WAV of any sample width, FLAC, OGG, MP3, ...). Files longer than ``max_seconds``
    (per their header) are refused before they are read (``None``: no limit).

    Raises:
        AudioDecodeError: the file is missing or cannot be decoded, holds no samples, holds
            NaN/Inf or absurdly large samples, has an implausible sample rate or is too long.
            Never any other exception for bad file contents.
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AudioDecodeError(name, "missing", "no such file")
    data, file_rate = _read(name, max_seconds)
    return _mono_at_rate(data, file_rate, sample_rate, name)


def decode_audio_bytes(
    data: bytes, sample_rate: int, *, name: str = "<bytes>", max_seconds: float | None = MAX_SECONDS
) -> torch.Tensor:
    """:func:`load_audio` for an encoded file held in memory (e.g. a WebDataset member).

    ``name`` is only used in error messages. Same checks, same output, same
    :class:`AudioDecodeError` reasons (except ``"missing"``).
    """
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    samples, file_rate = _read(name, max_seconds, io.BytesIO(data))
    return _mono_at_rate(samples, file_rate, sample_rate, name)


def _mono_at_rate(data: np.ndarray, file_rate: int, sample_rate: int, name: str) -> torch.Tensor:
    """Validate decoded samples ``[T, C]``, average the channels and resample to ``sample_rate``."""
    if data.size == 0:
        raise AudioDecodeError(name, "empty", "no audio samples")
    # max and min propagate NaN, and see ±Inf: two reductions, no temporary arrays
    high, low = float(data.max()), float(data.min())
    if not (math.isfinite(high) and math.isfinite(low)):
        raise AudioDecodeError(name, "non-finite", "NaN or Inf samples")
    peak = max(high, -low)
    if peak > MAX_ABS_SAMPLE:
        raise AudioDecodeError(name, "out-of-range", f"peak sample {peak:.3g}")

    # mono files skip the channel mean (exactly the samples it would give, ~0.2 ms per 10 s saved)
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    wave = torch.from_numpy(np.ascontiguousarray(mono))  # [T]
    if file_rate != sample_rate:
        wave = _resample(wave, file_rate, int(sample_rate))
    return wave.to(torch.float32).contiguous()
