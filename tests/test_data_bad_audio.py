"""Decoding odd, damaged and hostile audio files: a correct waveform or AudioDecodeError, nothing else."""

import io
import math
import os
import struct
import tempfile
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asit.data import AudioDecodeError, AudioEntry, PretrainDataset, collate_pretrain, load_audio
from asit.data.audio import check_header, decode_audio_bytes

SR = 32000
FUZZ_EXAMPLES = int(os.environ.get("ASIT_FUZZ_EXAMPLES", "1000"))  # about 6 s on 2 CPU cores


def _sine(rate: int, seconds: float, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _wav_bytes(data: np.ndarray, rate: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, data, rate, subtype=subtype, format=fmt)
    return buf.getvalue()


def _reason(path) -> str:
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path, SR)
    assert os.fspath(path) in str(info.value)  # the message names the file
    return info.value.reason


# ---- files that must be refused, with their reason ----------------------------------------------


def test_refused_files_name_file_and_reason(tmp_path):
    cases = {}
    (tmp_path / "empty.wav").write_bytes(b"")
    cases["empty.wav"] = "empty"
    sf.write(tmp_path / "no_frames.wav", np.zeros(0, dtype=np.float32), SR)
    cases["no_frames.wav"] = "empty"
    (tmp_path / "random.wav").write_bytes(np.random.default_rng(0).bytes(4096))
    cases["random.wav"] = "unreadable"
    (tmp_path / "text.wav").write_text("this is a text file, not audio\n" * 50)
    cases["text.wav"] = "unreadable"
    header_only = _wav_bytes(_sine(SR, 0.1), SR)[:30]  # cut inside the header
    (tmp_path / "cut_header.wav").write_bytes(header_only)
    cases["cut_header.wav"] = "unreadable"
    for name, bad in (("nan.wav", np.nan), ("inf.wav", np.inf), ("neginf.wav", -np.inf)):
        data = _sine(SR, 0.2)
        data[100] = bad
        sf.write(tmp_path / name, data, SR, subtype="FLOAT")
        cases[name] = "non-finite"
    sf.write(tmp_path / "huge.wav", _sine(SR, 0.2) * 1e9, SR, subtype="FLOAT")
    cases["huge.wav"] = "out-of-range"
    wav = bytearray(_wav_bytes(_sine(SR, 0.2), SR))
    struct.pack_into("<I", wav, 24, 7)  # sample rate field of the fmt chunk: 7 Hz
    (tmp_path / "rate7.wav").write_bytes(bytes(wav))
    cases["rate7.wav"] = "bad-sample-rate"
    cases["missing.wav"] = "missing"
    for name, reason in cases.items():
        assert _reason(tmp_path / name) == reason, name


def test_too_long_is_refused_before_reading(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, _sine(8000, 3.0), 8000)
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path, 8000, max_seconds=2.0)
    assert info.value.reason == "too-long"
    assert load_audio(path, 8000, max_seconds=None).numel() == 24000


# ---- files that must decode, with the right values ----------------------------------------------


@pytest.mark.parametrize(
    "subtype, tol",
    [("PCM_U8", 1 / 64), ("PCM_16", 1e-4), ("PCM_24", 1e-6), ("PCM_32", 1e-7), ("FLOAT", 0),
     ("DOUBLE", 1e-7)],
)
def test_wav_sample_formats(tmp_path, subtype, tol):
    data = _sine(SR, 0.25, amp=0.7)
    path = tmp_path / f"{subtype}.wav"
    sf.write(path, data, SR, subtype=subtype)
    wave = load_audio(path, SR)
    assert wave.dtype == torch.float32 and wave.shape == (data.size,)
    assert np.abs(wave.numpy() - data).max() <= tol


def test_flac_and_ogg(tmp_path):
    data = _sine(SR, 1.0, amp=0.6)
    sf.write(tmp_path / "a.flac", data, SR, subtype="PCM_16")
    sf.write(tmp_path / "a.ogg", data, SR, format="OGG", subtype="VORBIS")
    flac = load_audio(tmp_path / "a.flac", SR)
    assert flac.shape == (data.size,) and np.abs(flac.numpy() - data).max() <= 1e-4
    ogg = load_audio(tmp_path / "a.ogg", SR).numpy()
    assert abs(ogg.size - data.size) <= 1024  # lossy codec: length within a block
    n = min(ogg.size, data.size)
    err = np.sqrt(np.mean((ogg[:n] - data[:n]) ** 2)) / np.sqrt(np.mean(data**2))
    assert err < 0.1


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_other_sample_rates_are_resampled(tmp_path, rate):
    seconds, freq = 0.5, 1000.0
    path = tmp_path / f"r{rate}.wav"
    sf.write(path, _sine(rate, seconds, freq), rate, subtype="FLOAT")
    wave = load_audio(path, SR).numpy()
    assert wave.size == math.ceil(round(rate * seconds) * SR / rate)
    expected = _sine(SR, seconds, freq)[: wave.size]
    middle = slice(400, wave.size - 400)  # away from the filter's edge effects
    assert np.abs(wave[middle] - expected[middle]).max() < 0.02


def test_unusual_rate_uses_an_approximate_ratio_quickly(tmp_path):
    path = tmp_path / "odd.wav"
    sf.write(path, _sine(44056, 0.5), 44056, subtype="FLOAT")
    start = time.perf_counter()
    wave = load_audio(path, SR)
    assert time.perf_counter() - start < 5.0
    assert abs(wave.numel() - 0.5 * SR) <= 2 and torch.isfinite(wave).all()


def test_short_long_and_multichannel(tmp_path):
    sf.write(tmp_path / "tiny.wav", _sine(16000, 10 / 16000), 16000, subtype="FLOAT")  # 10 samples
    tiny = load_audio(tmp_path / "tiny.wav", 16000)
    assert tiny.shape == (10,)
    assert load_audio(tmp_path / "tiny.wav", SR).shape == (20,)

    sf.write(tmp_path / "long.wav", _sine(SR, 60.0, amp=0.3), SR)
    long = load_audio(tmp_path / "long.wav", SR)
    assert long.shape == (60 * SR,) and torch.isfinite(long).all()

    left, right = _sine(SR, 0.2, 300), _sine(SR, 0.2, 700, amp=0.2)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    stereo = load_audio(tmp_path / "stereo.wav", SR).numpy()
    np.testing.assert_allclose(stereo, (left + right) / 2, atol=1e-7)
    six = np.stack([_sine(SR, 0.2, 100 * (c + 1), amp=0.1) for c in range(6)], 1)
    sf.write(tmp_path / "surround.wav", six, SR, subtype="PCM_24")
    np.testing.assert_allclose(load_audio(tmp_path / "surround.wav", SR).numpy(), six.mean(1), atol=1e-6)


@pytest.mark.parametrize("kept", [0, 16, 2001, 12799])  # bytes of samples left of the 12800 announced
def test_a_truncated_wav_is_refused_as_truncated(tmp_path, kept):
    """libsndfile counts a cut WAV's frames from the bytes there (16 bytes: an 8-sample clip); the
    header's data size says how many there should be."""
    raw = _wav_bytes(_sine(SR, 0.2), SR, "PCM_16")  # 6400 samples: 12800 bytes after a 44-byte header
    announced = len(raw) - 44
    (tmp_path / "trunc.wav").write_bytes(raw[: 44 + min(kept, announced - 1)])
    assert _reason(tmp_path / "trunc.wav") == "truncated"
    with pytest.raises(AudioDecodeError, match=f"announces {announced} bytes"):
        check_header(tmp_path / "trunc.wav")
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_audio_bytes(raw[:44 + 16], SR)
    (tmp_path / "whole.wav").write_bytes(raw)
    assert load_audio(tmp_path / "whole.wav", SR).shape == (6400,)  # the whole file passes


# ---- through the dataset: skipped, counted, never a NaN batch -----------------------------------


def test_dataset_skips_and_counts_every_bad_file(tmp_path):
    good = []
    for i, (rate, subtype) in enumerate([(8000, "PCM_U8"), (44100, "PCM_24"), (48000, "FLOAT")]):
        sf.write(tmp_path / f"good{i}.wav", _sine(rate, 0.4, 300 + 100 * i), rate, subtype=subtype)
        good.append(str(tmp_path / f"good{i}.wav"))
    sf.write(tmp_path / "good.flac", _sine(16000, 0.3), 16000)
    good.append(str(tmp_path / "good.flac"))
    sf.write(tmp_path / "tiny.wav", _sine(SR, 10 / SR), SR)
    good.append(str(tmp_path / "tiny.wav"))
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("hello\n" * 100)
    nan = _sine(SR, 0.2)
    nan[5] = np.nan
    sf.write(tmp_path / "nan.wav", nan, SR, subtype="FLOAT")
    sf.write(tmp_path / "huge.wav", _sine(SR, 0.2) * 1e12, SR, subtype="FLOAT")
    bad = {"empty.wav": "empty", "text.wav": "unreadable", "nan.wav": "non-finite",
           "huge.wav": "out-of-range", "gone.wav": "missing"}
    paths = good[:2] + [str(tmp_path / b) for b in bad] + good[2:]
    ds = PretrainDataset([AudioEntry(p) for p in paths], sample_rate=SR, crop_seconds=0.3,
                         num_mel_bins=32, target_frames=32, roll_prob=0.5)
    batch = collate_pretrain([ds[i] for i in range(len(ds))])
    assert batch["views"].shape == (len(good), 2, 1, 32, 32)
    assert torch.isfinite(batch["views"]).all()
    assert batch["num_skipped"] == len(bad)
    assert batch["skip_reasons"] == list(bad.values())
    assert batch["skipped_indices"] == list(range(2, 2 + len(bad)))


# ---- fuzzing: random and mutated bytes ------------------------------------------------------------


def _seeds() -> list[bytes]:
    rng = np.random.default_rng(1)
    clip = (0.3 * rng.standard_normal(600)).astype(np.float32)
    stereo = np.stack([clip, clip[::-1]], 1)
    return [
        _wav_bytes(clip, 16000, "PCM_16"),
        _wav_bytes(clip, 44100, "FLOAT"),
        _wav_bytes(stereo, 8000, "PCM_24"),
        _wav_bytes(clip, 22050, "PCM_U8"),
        _wav_bytes(clip, 16000, "PCM_16", fmt="FLAC"),
    ]


SEEDS = _seeds()


@st.composite
def _mutated(draw) -> bytes:
    data = bytearray(SEEDS[draw(st.integers(0, len(SEEDS) - 1))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "header_int", "truncate", "insert"]))
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] = draw(st.integers(0, 255))
        elif kind == "header_int" and len(data) >= 48:
            pos = draw(st.integers(0, 44))  # RIFF size, fmt fields, data size ...
            special = st.sampled_from([0, 1, 2**31 - 1, 2**32 - 1, 0xFFFF])
            value = draw(st.one_of(special, st.integers(0, 2**32 - 1)))
            struct.pack_into("<I", data, pos, value)
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(blob=st.one_of(st.binary(max_size=2048), _mutated()),
       suffix=st.sampled_from([".wav", ".flac", ".ogg"]))
def test_fuzz_decodes_or_raises_audio_decode_error(blob, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "fuzz" + suffix)
        with open(path, "wb") as f:
            f.write(blob)
        start = time.perf_counter()
        try:
            wave = load_audio(path, SR)
        except AudioDecodeError as err:
            assert err.path == path and err.reason
        else:
            assert wave.dtype == torch.float32 and wave.dim() == 1 and wave.numel() > 0
            assert torch.isfinite(wave).all()
        assert time.perf_counter() - start < 10.0  # no hang


def test_errors_of_bytes_in_memory_name_the_member_not_a_file_object():
    with pytest.raises(AudioDecodeError) as info:
        decode_audio_bytes(b"not audio" * 100, SR, name="shard-000001.tar:000000042.wav")
    assert str(info.value) == "shard-000001.tar:000000042.wav: unreadable (LibsndfileError: Format not recognised.)"
    with pytest.raises(AudioDecodeError, match=r"^shard\.tar:7: empty \(0-byte file\)$"):
        decode_audio_bytes(b"", SR, name="shard.tar:7")
