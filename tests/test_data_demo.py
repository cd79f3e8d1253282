"""The synthetic demo corpus."""

import collections
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asit.data import DEMO_CLASSES, ensure_demo_dataset, load_manifest, synthesize_clip


@pytest.mark.parametrize("kind", DEMO_CLASSES)
def test_synthesize_clip_length_level_and_randomness(kind):
    a = synthesize_clip(kind, 16000, 0.5, np.random.default_rng(0))
    b = synthesize_clip(kind, 16000, 0.5, np.random.default_rng(0))
    c = synthesize_clip(kind, 16000, 0.5, np.random.default_rng(1))
    assert a.dtype == np.float32 and a.shape == (8000,)
    assert np.isfinite(a).all()
    assert 0.5 - 1e-6 <= np.abs(a).max() <= 0.9 + 1e-6
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown demo class 'bark'"):
        synthesize_clip("bark", 16000, 1.0, np.random.default_rng(0))


def test_classes_are_spectrally_different():
    """Tones are narrow-band and noise bursts broad: a crude check that classes are learnable."""

    def flatness(x):
        power = np.abs(np.fft.rfft(x)) ** 2 + 1e-12
        return np.exp(np.mean(np.log(power))) / np.mean(power)

    rng = np.random.default_rng(0)
    tone = np.mean([flatness(synthesize_clip("tone", 16000, 1.0, rng)) for _ in range(5)])
    noise = np.mean([flatness(synthesize_clip("noise_burst", 16000, 1.0, rng)) for _ in range(5)])
    assert noise > 10 * tone


def test_demo_dataset_written_balanced_and_idempotent(tmp_path):
    root = tmp_path / "demo"
    manifest = ensure_demo_dataset(root, num_clips=14, sample_rate=8000, seconds=0.5, seed=3)
    assert manifest == root / "manifest.csv"
    assert manifest.read_text().splitlines()[0] == "path,label"
    entries = load_manifest(manifest)
    assert len(entries) == 14
    counts = collections.Counter(e.labels for e in entries)
    assert set(counts) == {(k,) for k in DEMO_CLASSES}
    assert max(counts.values()) - min(counts.values()) <= 1
    info = sf.info(entries[0].path)
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (8000, 4000, 1, "PCM_16")
    assert json.loads((root / "params.json").read_text())["num_clips"] == 14

    files = [manifest] + [Path(e.path) for e in entries]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert ensure_demo_dataset(root, num_clips=14, sample_rate=8000, seconds=0.5, seed=3) == manifest
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_demo_dataset_regenerates_on_new_params_or_interruption(tmp_path):
    root = tmp_path / "demo"
    manifest = ensure_demo_dataset(root, num_clips=12, sample_rate=8000, seconds=0.25)
    ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    entries = load_manifest(manifest)
    assert len(entries) == 6
    assert len(list((root / "clips").rglob("*.wav"))) == 6  # stale clips removed

    manifest.unlink()  # as if the previous run died before writing the manifest
    ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    assert len(load_manifest(manifest)) == 6


def test_default_root_uses_asit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    manifest = ensure_demo_dataset(num_clips=6, sample_rate=8000, seconds=0.1)
    assert manifest == tmp_path / "cache" / "demo" / "manifest.csv"


def test_full_size_generation_is_fast(tmp_path):
    start = time.perf_counter()
    manifest = ensure_demo_dataset(tmp_path / "full")
    assert time.perf_counter() - start < 20.0
    assert len(load_manifest(manifest)) == 240
