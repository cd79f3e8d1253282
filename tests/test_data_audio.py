"""Audio decoding: mono downmix, resampling, sample formats, and the errors that name a bad file."""

import numpy as np
import pytest
import soundfile as sf
import torch

from asit.data import AudioDecodeError, load_audio


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
    for path, reason in [(junk, "unreadable"), (empty, "empty"), (no_samples, "empty")]:
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
