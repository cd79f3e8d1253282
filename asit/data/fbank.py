"""Kaldi-compatible log-mel filter banks (the AST/ASiT input), their AudioSet statistics and normalisation.

:func:`kaldi_fbank` is the per-clip reference: ``torchaudio.compliance.kaldi.fbank`` of the
mean-removed waveform, cut or zero-padded to a fixed number of frames. :func:`normalize_fbank` maps
a filter bank to ``(fbank - mean) / (2 std)``; :data:`AUDIOSET_MEAN` and :data:`AUDIOSET_STD` (the
AST statistics of AudioSet's fbank values) are the package's defaults for ``mean`` and ``std``.

:class:`KaldiFbank` and :func:`batched_kaldi_fbank` are a batched version on any device,
a vectorised re-implementation of ``torchaudio.compliance.kaldi.fbank`` with the settings the
ASiT/AST pipeline uses (docs/design.md §1): 25 ms Hanning window, 10 ms shift, ``snip_edges``, FFT size
rounded up to a power of two, per-frame DC removal, pre-emphasis 0.97, no dither, power spectrum,
Kaldi mel banks (20 Hz to Nyquist), log with a floor at float32 epsilon, no energy column
(``htk_compat`` then changes nothing). As in :func:`kaldi_fbank`, the mean of the
whole waveform is removed first and the result is cut or zero-padded to ``target_frames``.

The time-domain steps (frame mean, pre-emphasis, window) are the same tensor operations in the
same order as torchaudio's, so each clip's result agrees with the per-clip reference to a few
float32 ulps even in bins that hold only rounding noise (pure tones). The speed comes from
batching (one FFT for a chunk of frames), the window and mel matrix built once and cached per
settings and device (converted to the input's dtype), a cheaper power spectrum (``re² + im²``,
squared in place, instead of ``|X|²``; on the CPU NumPy's ``|X|``, squared), a banded mel
projection and NumPy's SIMD ``log`` (steps after the FFT only change rounding relative to each
value, ~1e-6 after the log).
"""

from __future__ import annotations

import functools
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

# AudioSet's fbank statistics live in the config module (the recipes' defaults need them without torch)
from asit.config import AUDIOSET_MEAN, AUDIOSET_STD

__all__ = [
    "AUDIOSET_MEAN",
    "AUDIOSET_STD",
    "KaldiFbank",
    "batched_kaldi_fbank",
    "fbank_views",
    "kaldi_fbank",
    "normalize_fbank",
    "num_fbank_frames",
]


_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0

_EPS = torch.finfo(torch.float32).eps  # Kaldi's floor before the log, whatever the dtype
# On the CPU the batch is processed in chunks of about this many frames so that the frame
# buffer and its spectrum stay in cache (about 4 MB each at 32 kHz).
_CPU_CHUNK_FRAMES = 1024
# On the CPU the mel projection is done per band of this many filters, each over only the FFT
# bins its filters touch: the triangular filters make the dense matrix ~90 % zeros, and 12
# filters per band measured fastest (one 2-D matmul per band and view; 5x faster than one
# dense matmul at 128 bins, 32 kHz; 8 and 16 filters were 3 % and 11 % slower).
_CPU_FILTERS_PER_BAND = 12


# On the CPU the steps after the FFT run partly in NumPy (see _log_mel_cpu); False runs the pure-torch
# path that other devices take (a test uses it to check that path on the CPU).
_NUMPY_ON_CPU = True


def _matmul_may_use_tf32(device: torch.device) -> bool:
    """Whether a float32 matmul on ``device`` may run in TF32 (enabled globally, e.g. by
    ``torch.set_float32_matmul_precision("high")``): the mel matmul then runs in float64."""
    return device.type == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)


def num_fbank_frames(num_samples: int, window_size: int, window_shift: int) -> int:
    """Frames ``snip_edges`` gives for ``num_samples`` (at least 1: short input is zero-padded)."""
    if num_samples < window_size:
        return 1
    return 1 + (num_samples - window_size) // window_shift


def kaldi_fbank(
    wave: torch.Tensor, sample_rate: int, num_mel_bins: int = 128, target_frames: int = 592
) -> torch.Tensor:
    """Log-mel filter bank of a mono waveform, cut or zero-padded to a fixed number of frames.

    Args:
        wave: ``(T,)`` waveform.
        sample_rate: its sample rate in Hz.
        num_mel_bins: number of mel bands ``F``.
        target_frames: number of 10 ms frames ``T'`` in the output.

    Returns:
        float32 tensor ``(target_frames, num_mel_bins)``: the waveform's mean is removed, then
        ``torchaudio.compliance.kaldi.fbank`` (25 ms Hanning window, 10 ms shift,
        ``htk_compat``, no energy, no dither); frames past ``target_frames`` are dropped and
        missing ones are zeros at the end.
    """
    if wave.dim() != 1:
        raise ValueError(f"wave must be 1-D (T,), got shape {tuple(wave.shape)}")
    if target_frames <= 0 or num_mel_bins <= 0:
        raise ValueError(
            f"target_frames and num_mel_bins must be positive, got {target_frames}, {num_mel_bins}"
        )
    wave = wave.to(torch.float32)
    wave = wave - wave.mean() if wave.numel() > 0 else wave
    # kaldi.fbank needs at least one full window; shorter input is padded to one frame.
    window = int(sample_rate * _FRAME_LENGTH_MS / 1000)
    if wave.numel() < window:
        wave = F.pad(wave, (0, window - wave.numel()))
    fbank = kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=float(sample_rate),
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=_FRAME_SHIFT_MS,
        frame_length=_FRAME_LENGTH_MS,
    )  # [frames, F]
    frames = fbank.shape[0]
    if frames > target_frames:
        fbank = fbank[:target_frames]
    elif frames < target_frames:
        fbank = F.pad(fbank, (0, 0, 0, target_frames - frames))
    return fbank.contiguous()


def normalize_fbank(fbank: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Return ``(fbank - mean) / (2 * std)``, the AST/ASiT input normalisation."""
    if std <= 0:
        raise ValueError(f"std must be positive, got {std}")
    return (fbank - mean) / (2.0 * std)


class KaldiFbank(nn.Module):
    """Log-mel filter banks of a batch of mono waveforms, Kaldi-compatible.

    Args:
        sample_rate: sample rate of the input in Hz.
        num_mel_bins: number of mel bands ``F``.
        target_frames: frames ``T'`` of the output (cut, or zero-padded at the end);
            ``None`` keeps every frame.
        frame_length_ms, frame_shift_ms: window length and hop in milliseconds.
        preemphasis: pre-emphasis coefficient (0 disables it).
        low_freq, high_freq: mel range in Hz; ``high_freq <= 0`` is an offset from Nyquist.
        remove_wave_mean: subtract the mean of each whole waveform first (ASiT/AST do).

    ``forward(waves)`` takes ``(B, T)`` (or ``(T,)``) floating-point waveforms and returns
    ``(B, T', F)`` (or ``(T', F)``): float64 for float64 input, float32 otherwise; it never
    carries gradients (the input is detached). ``forward(waves, normalize=(mean, std))`` returns
    ``(fbank - mean) / (2 std)`` instead. It keeps full precision under autocast and with TF32
    enabled globally (its mel matmul then runs in float64 on CUDA). The window and the mel matrix
    are non-persistent buffers: ``.to(device)`` moves them and they never enter a ``state_dict``.
    """

    def __init__(
        self,
        sample_rate: int,
        num_mel_bins: int = 128,
        target_frames: int | None = 592,
        *,
        frame_length_ms: float = _FRAME_LENGTH_MS,
        frame_shift_ms: float = _FRAME_SHIFT_MS,
        preemphasis: float = 0.97,
        low_freq: float = 20.0,
        high_freq: float = 0.0,
        remove_wave_mean: bool = True,
    ) -> None:
        super().__init__()
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if num_mel_bins <= 3:
            raise ValueError(f"num_mel_bins must be > 3 (Kaldi's limit), got {num_mel_bins}")
        if target_frames is not None and target_frames <= 0:
            raise ValueError(f"target_frames must be positive or None, got {target_frames}")
        if not 0.0 <= preemphasis <= 1.0:
            raise ValueError(f"preemphasis must be in [0, 1], got {preemphasis}")
        # Same integer arithmetic as torchaudio (truncation, not rounding).
        self.window_size = int(sample_rate * frame_length_ms * 0.001)
        self.window_shift = int(sample_rate * frame_shift_ms * 0.001)
        if self.window_size < 2 or self.window_shift < 1:
            raise ValueError(
                f"window of {self.window_size} samples / shift of {self.window_shift} samples is too small"
            )
        self.fft_size = 1 << (self.window_size - 1).bit_length()  # next power of two
        self.sample_rate = sample_rate
        self.num_mel_bins = num_mel_bins
        self.target_frames = target_frames
        self.preemphasis = preemphasis
        self.remove_wave_mean = remove_wave_mean

        banks, _ = kaldi.get_mel_banks(
            num_mel_bins, self.fft_size, float(sample_rate), low_freq, high_freq, 100.0, -500.0, 1.0
        )  # [F, fft_size // 2]; the Nyquist bin gets weight 0, as in torchaudio
        mel = F.pad(banks.to(torch.float32), (0, 1)).t().contiguous()  # [K = fft_size // 2 + 1, F]
        window = torch.hann_window(self.window_size, periodic=False, dtype=torch.float32)  # [W]
        self.register_buffer("mel", mel, persistent=False)
        self.register_buffer("window", window, persistent=False)
        # Hann's first weight is exactly 0: it zeroes the first sample of every frame whatever
        # pre-emphasis wrote there, so _spectrum skips that write.
        assert window[0] == 0
        # Bands of filters for the CPU path: (first filter, end filter, first bin, end bin).
        self._bands: list[tuple[int, int, int, int]] = []
        used = mel != 0  # [K, F]
        for first in range(0, num_mel_bins, _CPU_FILTERS_PER_BAND):
            end = min(first + _CPU_FILTERS_PER_BAND, num_mel_bins)
            bins = used[:, first:end].any(dim=1).nonzero().flatten()
            lo, hi = (int(bins.min()), int(bins.max()) + 1) if bins.numel() else (0, 1)
            self.register_buffer(
                f"mel_band{len(self._bands)}", mel[lo:hi, first:end].contiguous(), persistent=False
            )
            self._bands.append((first, end, lo, hi))

    def extra_repr(self) -> str:
        return (
            f"sample_rate={self.sample_rate}, num_mel_bins={self.num_mel_bins}, "
            f"target_frames={self.target_frames}, window={self.window_size}, shift={self.window_shift}, "
            f"fft={self.fft_size}"
        )

    def forward(self, waves: torch.Tensor, normalize: tuple[float, float] | None = None) -> torch.Tensor:
        """Fbank of ``waves``; with ``normalize=(mean, std)`` also ``(fbank - mean) / (2 std)``, in place.

        The normalised result is bit-identical to :func:`normalize_fbank` of
        the plain one (the same two float32 operations), without a second pass over the batch.
        """
        if not isinstance(waves, torch.Tensor) or not waves.is_floating_point():
            raise TypeError("waves must be a floating-point tensor")
        if waves.dim() not in (1, 2):
            raise ValueError(f"waves must be (B, T) or (T,), got shape {tuple(waves.shape)}")
        if waves.device != self.mel.device:
            raise ValueError(f"waves is on {waves.device} but the module is on {self.mel.device}; use .to()")
        single = waves.dim() == 1
        x = waves.unsqueeze(0) if single else waves
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.detach().to(dtype)  # a feature extractor, not differentiable (in-place and NumPy steps)
        if normalize is not None:
            mean, std = normalize
            if not std > 0:
                raise ValueError(f"normalize: std must be positive, got {std}")
        # autocast would run the mel matmul in half precision (~1e-2 off)
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            out = self._fbank(x, normalize)
        return out[0] if single else out

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Whole-wave DC removal, pad to one window, and drop samples no kept frame reads."""
        if self.remove_wave_mean and x.shape[1] > 0:
            x = x - x.mean(dim=1, keepdim=True)
        if x.shape[1] < self.window_size:
            x = F.pad(x, (0, self.window_size - x.shape[1]))
        if self.target_frames is not None:
            needed = self.window_size + (self.target_frames - 1) * self.window_shift
            x = x[:, :needed]
        return x

    def _fbank(self, x: torch.Tensor, normalize: tuple[float, float] | None) -> torch.Tensor:
        batch, length = x.shape
        frames = num_fbank_frames(length, self.window_size, self.window_shift)
        out_frames = frames if self.target_frames is None else self.target_frames
        out = x.new_zeros(batch, out_frames, self.num_mel_bins)  # [B, T', F]
        keep = min(frames, out_frames)
        window = self.window.to(x.dtype)
        cpu = x.device.type == "cpu"
        numpy_path = cpu and _NUMPY_ON_CPU
        step = max(1, _CPU_CHUNK_FRAMES // frames) if cpu else max(batch, 1)
        # One frame buffer for all chunks: its zero tail (the FFT padding) is written once.
        buf = x.new_zeros(min(step, batch), keep, self.fft_size)  # [b, M, N]
        if numpy_path:  # the CPU path's transposed mel bands and energies, once per call
            bands = [(getattr(self, f"mel_band{i}").t().to(x.dtype), band) for i, band in enumerate(self._bands)]
            energies_t = x.new_empty(self.num_mel_bins, keep)  # [F, M]
        for start in range(0, batch, step):
            chunk = self._prepare(x[start : start + step])  # [b, T]
            spec = self._spectrum(chunk, keep, window, buf[: chunk.shape[0]])  # [b, M, K] complex
            energies = out[start : start + step, :keep]  # [b, M, F], written in place
            if numpy_path:
                self._log_mel_cpu(spec, energies, bands, energies_t)
            else:
                squares = torch.view_as_real(spec).square_()  # [b, M, K, 2], squared in place
                power = torch.add(squares[..., 0], squares[..., 1])  # |X|^2 = re^2 + im^2
                mel = self.mel.to(x.dtype)
                if x.dtype == torch.float32 and _matmul_may_use_tf32(x.device):  # TF32 keeps 10 mantissa bits
                    energies.copy_(torch.matmul(power.double(), mel.double()))
                else:
                    energies.copy_(torch.matmul(power, mel))
                energies.clamp_min_(_EPS).log_()
            if normalize is not None:  # the same float32 operations as normalize_fbank, in place, while in cache
                out[start : start + step].sub_(normalize[0]).div_(2.0 * normalize[1])
        return out

    def _spectrum(self, x: torch.Tensor, frames: int, window: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
        """Spectrum ``(b, M, K)`` (complex) of the first ``frames`` frames of ``x`` ``(b, T)``.

        ``buf`` ``(b, M, N)`` receives the windowed frames; its tail past the window must be zero.
        """
        size = self.window_size
        strided = x.unfold(1, size, self.window_shift)[:, :frames]  # [b, M, W] (a view)
        head = buf[..., :size]
        # Same operations, in the same order, as torchaudio's _get_window, so rounding matches.
        torch.sub(strided, torch.mean(strided, dim=2).unsqueeze(2), out=head)  # per-frame DC offset
        if self.preemphasis != 0.0:
            # x[j] - a * x[j - 1], with x[-1] := x[0] (torchaudio's replicate padding)
            scaled = head * self.preemphasis
            head[..., 1:].sub_(scaled[..., :-1])
            # (j = 0 would be x[0] - a * x[0], but the window's first weight is 0: the sample becomes ±0
            # either way, and the power spectrum is the same bit for bit)
        head.mul_(window)
        return torch.fft.rfft(buf)

    def _log_mel_cpu(self, spec: torch.Tensor, out: torch.Tensor, bands: list, energies_t: torch.Tensor) -> None:
        """``out[...] = log(max(|spec|² @ mel, eps))`` on the CPU, view by view.

        One 2-D matmul per band of filters (``bands``: transposed band matrices with their filter and bin
        ranges) writes the transposed energies into ``energies_t`` ``(F, M)`` (contiguous rows, so no
        copy), then NumPy's SIMD ``log`` (~3x faster than torch's here, within a few ulps, ~1e-6
        absolute) reads them transposed into ``out``.
        """
        power = np.abs(spec.numpy())  # |X| (hypot, as torchaudio's abs), faster than re² + im² in torch or NumPy
        with np.errstate(over="ignore"):  # inf, as torch gives, without a warning
            np.square(power, out=power)
        power = torch.from_numpy(power)  # [b, M, K]
        for view, log_mel in zip(power, out):
            for mel_t, (first, end, lo, hi) in bands:
                torch.mm(mel_t, view[:, lo:hi].t(), out=energies_t[first:end])
            energies_t.clamp_min_(_EPS)
            np.log(energies_t.numpy().T, out=log_mel.numpy())


@functools.lru_cache(maxsize=32)
def _cached_module(
    sample_rate: int, num_mel_bins: int, target_frames: int | None, device: torch.device, options: tuple
) -> KaldiFbank:
    return KaldiFbank(sample_rate, num_mel_bins, target_frames, **dict(options)).to(device)


def batched_kaldi_fbank(
    waves: torch.Tensor,
    sample_rate: int,
    num_mel_bins: int = 128,
    target_frames: int | None = 592,
    *,
    normalize: tuple[float, float] | None = None,
    **options: float | bool,
) -> torch.Tensor:
    """Kaldi fbank of each row of ``waves`` ``(B, T)`` → ``(B, target_frames, num_mel_bins)``.

    Row ``i`` equals :func:`kaldi_fbank` of ``waves[i]`` (within float32 rounding):
    mean removed, ``torchaudio.compliance.kaldi.fbank`` with the ASiT settings, cut or
    zero-padded to ``target_frames`` (``None`` keeps all frames). Works on any device; the
    window and mel matrix are built once per (settings, device) and cached. ``options`` are
    :class:`KaldiFbank`'s keyword arguments. A ``(T,)`` input gives ``(T', F)``.
    ``normalize=(mean, std)`` returns ``(fbank - mean) / (2 std)`` instead (bit-identical to
    :func:`normalize_fbank` of the plain result, without its extra pass).
    """
    module = _cached_module(
        int(sample_rate), int(num_mel_bins), target_frames, waves.device, tuple(sorted(options.items()))
    )
    return module(waves, normalize)


def fbank_views(waves: torch.Tensor, sample_rate: int, num_mel_bins: int, frames: int, mean: float,
                std: float) -> torch.Tensor:
    """Waveform crops ``(B, V, L)`` → normalised fbank views ``(B, V, 1, frames, num_mel_bins)``.

    One :func:`batched_kaldi_fbank` call for all ``B·V`` crops on their device, then
    ``(fbank - mean) / (2 std)`` (:func:`normalize_fbank`). This is what the
    loader workers compute per clip with ``data.fbank_on=loader``; with ``data.fbank_on=device`` the
    trainer calls it on the GPU for the whole batch (and the DALI loader does with
    ``data.dali_fbank=torch``).
    """
    if waves.dim() != 3:
        raise ValueError(f"waves must be (B, V, L), got shape {tuple(waves.shape)}")
    b, v, length = waves.shape
    views = batched_kaldi_fbank(waves.reshape(b * v, length), sample_rate, num_mel_bins, frames, normalize=(mean, std))
    return views.reshape(b, v, 1, frames, num_mel_bins)
