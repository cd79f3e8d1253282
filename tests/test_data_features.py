"""Audio decoding, fbank features, normalisation and waveform transforms."""

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.compliance.kaldi as kaldi

from asit.data import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    AudioDecodeError,
    kaldi_fbank,
    load_audio,
    normalize_fbank,
    pad_or_crop_random,
    random_roll,
)


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


def test_stereo_is_averaged_to_mono(tmp_path):
    rng = np.random.default_rng(0)
    stereo = rng.uniform(-0.5, 0.5, size=(1000, 2)).astype(np.float32)
    path = tmp_path / "st.wav"
    sf.write(path, stereo, 16000, subtype="FLOAT")
    wave = load_audio(path, 16000)
    assert wave.dtype == torch.float32 and wave.shape == (1000,)
    torch.testing.assert_close(wave, torch.from_numpy(stereo.mean(axis=1)))


def test_resampling_changes_length(tmp_path):
    path = tmp_path / "s.wav"
    t = np.arange(16000) / 16000
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    wave = load_audio(path, 32000)
    assert wave.shape == (32000,)
    # A 440 Hz tone stays a 440 Hz tone.
    spectrum = torch.fft.rfft(wave).abs()
    assert abs(int(spectrum.argmax()) - 440) <= 1


@pytest.mark.parametrize(
    "subtype,tol",
    [("PCM_U8", 1e-2), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-6), ("FLOAT", 0.0), ("DOUBLE", 0.0)],
)
def test_wav_sample_formats(tmp_path, subtype, tol):
    rng = np.random.default_rng(1)
    signal = rng.uniform(-0.9, 0.9, size=800).astype(np.float32)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, signal, 8000, subtype=subtype)
    wave = load_audio(path, 8000)
    assert wave.dtype == torch.float32 and wave.shape == (800,)
    assert float((wave - torch.from_numpy(signal)).abs().max()) <= tol


def test_corrupt_and_empty_files_raise_naming_path(tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    no_samples = tmp_path / "nosamples.wav"
    sf.write(no_samples, np.zeros((0, 1), dtype=np.float32), 8000)
    for path, reason in [(junk, "unreadable"), (empty, "unreadable"), (no_samples, "empty")]:
        with pytest.raises(AudioDecodeError) as info:
            load_audio(path, 8000)
        assert str(path) in str(info.value)
        assert info.value.reason == reason
        assert info.value.path == str(path)


def test_non_finite_samples_raise(tmp_path):
    signal = np.zeros(100, dtype=np.float32)
    signal[10] = np.nan
    path = tmp_path / "nan.wav"
    sf.write(path, signal, 8000, subtype="FLOAT")
    with pytest.raises(AudioDecodeError, match=r"nan\.wav: non-finite"):
        load_audio(path, 8000)


def test_decode_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(AudioDecodeError("/x.wav", "empty", "no audio samples")))
    assert (err.path, err.reason, str(err)) == ("/x.wav", "empty", "/x.wav: empty (no audio samples)")


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


def test_pad_or_crop_random():
    wave = torch.arange(10, dtype=torch.float32)
    padded = pad_or_crop_random(wave, 14, None)
    assert torch.equal(padded, torch.cat([wave, torch.zeros(4)]))
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        crop = pad_or_crop_random(wave, 4, g)
        start = int(crop[0])
        assert torch.equal(crop, wave[start : start + 4])  # contiguous window, no resizing
        starts.add(start)
    assert starts == set(range(7))  # every offset 0..6 reachable


def test_random_roll_probability_and_shift():
    wave = torch.arange(50, dtype=torch.float32)
    assert torch.equal(random_roll(wave, 0.0, torch.Generator().manual_seed(0)), wave)
    g = torch.Generator().manual_seed(1)
    rolled = [random_roll(wave, 1.0, g) for _ in range(20)]
    for r in rolled:
        shift = int((50 - int(r[0])) % 50)
        assert torch.equal(r, torch.roll(wave, shift))
    assert len({int(r[0]) for r in rolled}) > 5
    g = torch.Generator().manual_seed(2)
    changed = sum(not torch.equal(random_roll(wave, 0.5, g), wave) for _ in range(400))
    assert 150 < changed < 250
