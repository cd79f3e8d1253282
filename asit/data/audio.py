"""Decode an audio file into a mono float32 waveform at a chosen sample rate, and the rules a file must pass.

:func:`load_audio` (a file) and :func:`decode_audio_bytes` (a file held in memory) decode; every refusal
is an :class:`AudioDecodeError` with a fixed ``reason``. The rules on a file's header alone
(:func:`header_reason`, and :func:`check_header` for a file on disk, which also finds 0-byte and
truncated files) are the same ones the decoders apply before reading the samples, so a check that reads
only headers (``scripts/check_data.py``, the DALI loader's inventory) refuses what training would.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
import struct
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import soundfile as sf
import torch
import torchaudio.transforms as T

__all__ = ["MAX_SECONDS", "AudioDecodeError", "AudioHeader", "check_header", "decode_audio_bytes", "header_reason",
           "load_audio"]

logger = logging.getLogger(__name__)


# Limits that keep a damaged or hostile header from costing unbounded memory or time.
MIN_FILE_RATE = 1000  # Hz; below this a header is taken as damaged
MAX_FILE_RATE = 1_000_000
MAX_SECONDS = 3600.0  # default cap on a clip's duration (checked on the header, before reading)
MAX_ABS_SAMPLE = 1e6  # larger float samples would overflow the float32 power spectrum
# torchaudio's sinc resampler builds a [new, orig + 2·width] kernel for the reduced ratio
# orig/new; past this size the ratio is approximated (relative error below 1e-5).
_MAX_RESAMPLE_KERNEL = 4_000_000
# How much of a file's start is searched for a WAV's "data" chunk (chunks before it are small metadata).
_WAV_HEAD_BYTES = 1 << 16
# A WAV "data" size that streaming writers leave when the length is unknown: no claim to check.
_WAV_UNKNOWN_SIZES = (0, 0xFFFFFFFF)


class AudioDecodeError(RuntimeError):
    """A clip could not be turned into a usable waveform.

    ``reason`` is a short, fixed category suitable for counting: ``"missing"`` (no such file),
    ``"unreadable"`` (not decodable), ``"empty"`` (no samples), ``"non-finite"`` (NaN/Inf samples),
    ``"out-of-range"`` (float samples beyond ±1e6), ``"bad-sample-rate"``, ``"too-long"``,
    ``"truncated"`` (the file ends before the samples its header announces); ``detail`` says more.
    A 0-byte file is ``"empty"``. ``str(err)`` names the file.
    """

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(path, reason, detail)  # args kept so the error pickles across workers
        self.path = path
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.path}: {self.reason}{extra}"


class AudioHeader(NamedTuple):
    """What a file's header says: frames (as libsndfile counts them), sample rate, channels, format name."""

    frames: int
    sample_rate: int
    channels: int
    format: str


def header_reason(frames: int, rate: int, channels: int, *,
                  max_seconds: float | None = MAX_SECONDS) -> tuple[str, str] | None:
    """The decoders' verdict on a header: ``(reason, detail)`` of :class:`AudioDecodeError`, or None if the
    file may be read. Refused: an implausible rate (``"bad-sample-rate"``), no channels (``"unreadable"``),
    more than ``max_seconds`` (``"too-long"``, None: no limit), no frames (``"empty"``)."""
    if not MIN_FILE_RATE <= rate <= MAX_FILE_RATE:
        return "bad-sample-rate", f"{rate} Hz in the header"
    if channels < 1:
        return "unreadable", f"{channels} channels in the header"
    if max_seconds is not None and frames > max_seconds * rate:
        return "too-long", f"{frames / rate:.0f} s > {max_seconds:.0f} s"
    if frames <= 0:
        return "empty", "no audio samples"
    return None


def _wav_shortfall(head: bytes, size: int) -> str | None:
    """Why a WAV file of ``size`` bytes starting with ``head`` is cut short (None: complete, or not a WAV,
    or no claim to check). libsndfile counts a truncated WAV's frames from the bytes that are there, so a
    file cut after 16 bytes of samples would otherwise pass as a clip of 8 samples."""
    if len(head) < 12 or head[8:12] != b"WAVE" or head[:4] not in (b"RIFF", b"RIFX"):
        return None
    order = "<" if head[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos:pos + 4], struct.unpack(order + "I", head[pos + 4:pos + 8])[0]
        if chunk == b"data":
            held = size - (pos + 8)
            if length in _WAV_UNKNOWN_SIZES or length <= held:
                return None
            return f"the header announces {length} bytes of samples, the file holds {max(held, 0)}"
        pos += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def _describe(exc: Exception) -> str:
    """An exception of libsndfile as a detail: its own words (``error_string``), without the file object's
    repr that ``str(exc)`` holds for a file in memory (``<_io.BytesIO object at 0x...>``)."""
    return f"{type(exc).__name__}: {getattr(exc, 'error_string', None) or exc}"


def _open_checked(name: str, source: io.BytesIO | None, max_seconds: float | None) -> tuple[sf.SoundFile, AudioHeader]:
    """``source`` (default: the file ``name``) opened with soundfile after the header rules passed: 0-byte
    (``"empty"``), unopenable (``"unreadable"``), :func:`header_reason` and truncated WAV files are refused."""
    head = b""
    if source is None:
        try:
            size = os.path.getsize(name)
            if size > 0:
                with open(name, "rb") as fh:
                    head = fh.read(_WAV_HEAD_BYTES)
        except OSError as exc:
            raise AudioDecodeError(name, "unreadable", f"{type(exc).__name__}: {exc}") from exc
    else:
        with source.getbuffer() as buf:
            size, head = buf.nbytes, bytes(buf[:_WAV_HEAD_BYTES])
    if size == 0:
        raise AudioDecodeError(name, "empty", "0-byte file")
    try:
        handle = sf.SoundFile(name if source is None else source)
    except Exception as exc:  # libsndfile raises several types; all mean "cannot decode"
        raise AudioDecodeError(name, "unreadable", _describe(exc)) from exc
    header = AudioHeader(int(handle.frames), int(handle.samplerate), int(handle.channels), str(handle.format))
    verdict = header_reason(header.frames, header.sample_rate, header.channels, max_seconds=max_seconds)
    if (verdict is None or verdict[0] == "empty") and (short := _wav_shortfall(head, size)) is not None:
        verdict = ("truncated", short)
    if verdict is not None:
        handle.close()
        raise AudioDecodeError(name, *verdict)
    return handle, header


def check_header(path: str | os.PathLike, *, max_seconds: float | None = MAX_SECONDS) -> AudioHeader:
    """The header of the file ``path`` after the checks :func:`load_audio` makes before reading samples
    (missing, 0-byte or frameless ``"empty"``, ``"unreadable"``, ``"bad-sample-rate"``, ``"too-long"``,
    ``"truncated"``); reads a few kB, not the samples.

    Raises:
        AudioDecodeError: the file fails one of them.
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise AudioDecodeError(name, "missing", "no such file")
    handle, header = _open_checked(name, None, max_seconds)
    handle.close()
    return header


def _read(name: str, max_seconds: float | None, source: io.BytesIO | None = None) -> tuple[np.ndarray, int]:
    """``(samples [T, C] float32, file rate)`` of ``source`` (default: the file ``name``);
    header checks come before any large allocation."""
    handle, header = _open_checked(name, source, max_seconds)
    try:
        with handle:
            data = handle.read(dtype="float32", always_2d=True)  # [T, C]
    except Exception as exc:  # libsndfile raises several types; all mean "cannot decode"
        raise AudioDecodeError(name, "unreadable", _describe(exc)) from exc
    # fewer samples than the header's count: cut short (an MP3's count is an estimate from its bit rate)
    if data.shape[0] < header.frames and header.format != "MP3":
        raise AudioDecodeError(name, "truncated", f"{data.shape[0]} of the {header.frames} frames announced")
    return data, header.sample_rate


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
