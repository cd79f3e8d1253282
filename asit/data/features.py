"""Kaldi-compatible log-mel filter banks, as used by AST, SSAST and ASiT."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi

__all__ = ["AUDIOSET_MEAN", "AUDIOSET_STD", "kaldi_fbank", "normalize_fbank"]

# Mean and standard deviation of the AudioSet fbank values (the AST statistics).
AUDIOSET_MEAN = -4.2677393
AUDIOSET_STD = 4.5689974

_FRAME_LENGTH_MS = 25.0
_FRAME_SHIFT_MS = 10.0


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
