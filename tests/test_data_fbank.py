"""The per-clip Kaldi fbank against torchaudio, and the fbank normalisation."""

import pytest
import torch
import torchaudio.compliance.kaldi as kaldi

from asit.data import AUDIOSET_MEAN, AUDIOSET_STD, kaldi_fbank, normalize_fbank


def _reference_fbank(wave, sr, bins=128):
    wave = wave - wave.mean()
    return kaldi.fbank(
        wave.unsqueeze(0),
        htk_compat=True,
        sample_frequency=sr,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=bins,
        dither=0.0,
        frame_shift=10,
        frame_length=25,
    )


def test_fbank_matches_kaldi_reference_and_is_cut_to_592():
    g = torch.Generator().manual_seed(3)
    wave = 0.1 * torch.randn(6 * 32000, generator=g) + 0.3  # the DC offset must be removed
    ref = _reference_fbank(wave, 32000)
    assert ref.shape == (598, 128)
    out = kaldi_fbank(wave, 32000)
    assert out.shape == (592, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref[:592])


def test_fbank_pads_short_input_with_zeros():
    wave = torch.randn(16000, generator=torch.Generator().manual_seed(4))  # 1 s → 98 frames at 16 kHz
    ref = _reference_fbank(wave, 16000, bins=64)
    out = kaldi_fbank(wave, 16000, num_mel_bins=64, target_frames=150)
    assert out.shape == (150, 64)
    torch.testing.assert_close(out[: ref.shape[0]], ref)
    assert torch.count_nonzero(out[ref.shape[0] :]) == 0


def test_fbank_of_silence_and_tiny_input_is_finite():
    assert torch.isfinite(kaldi_fbank(torch.zeros(32000), 32000, target_frames=100)).all()
    tiny = kaldi_fbank(torch.ones(10), 16000, num_mel_bins=32, target_frames=5)
    assert tiny.shape == (5, 32) and torch.isfinite(tiny).all()


def test_fbank_rejects_bad_shape():
    with pytest.raises(ValueError, match="wave must be 1-D"):
        kaldi_fbank(torch.zeros(2, 1000), 16000)


def test_normalize_formula():
    x = torch.tensor([AUDIOSET_MEAN, AUDIOSET_MEAN + 2 * AUDIOSET_STD, 0.0])
    out = normalize_fbank(x, AUDIOSET_MEAN, AUDIOSET_STD)
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0, -AUDIOSET_MEAN / (2 * AUDIOSET_STD)]))
