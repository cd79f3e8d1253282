"""The synthetic demo corpus."""

import collections
import json
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from asit.data import DEMO_CLASSES, ensure_demo_dataset, load_manifest, synthesize_clip
from asit.data.demo import demo_dataset_dir


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
    assert manifest == root / "n14-sr8000-0.5s-seed3" / "manifest.csv"
    assert manifest.read_text().splitlines()[0] == "path,label"
    entries = load_manifest(manifest)
    assert len(entries) == 14
    counts = collections.Counter(e.labels for e in entries)
    assert set(counts) == {(k,) for k in DEMO_CLASSES}
    assert max(counts.values()) - min(counts.values()) <= 1
    info = sf.info(entries[0].path)
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (8000, 4000, 1, "PCM_16")
    assert json.loads((manifest.parent / "params.json").read_text())["num_clips"] == 14

    files = [manifest] + [Path(e.path) for e in entries]
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert ensure_demo_dataset(root, num_clips=14, sample_rate=8000, seconds=0.5, seed=3) == manifest
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes


def test_corpora_of_other_parameters_never_overwrite_each_other(tmp_path):
    """Fine-tuning's demo (120 clips) next to pretraining's (240) used to rewrite the one shared folder."""
    root = tmp_path / "demo"
    big = ensure_demo_dataset(root, num_clips=12, sample_rate=8000, seconds=0.25)
    mtimes = {p: p.stat().st_mtime_ns for p in big.parent.rglob("*") if p.is_file() and p.name != ".lock"}
    small = ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    other_seed = ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25, seed=1)
    assert len({big.parent, small.parent, other_seed.parent}) == 3
    assert small.parent == demo_dataset_dir(root, num_clips=6, sample_rate=8000, seconds=0.25)
    assert (len(load_manifest(big)), len(load_manifest(small))) == (12, 6)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert len(list((big.parent / "clips").rglob("*.wav"))) == 12


def test_demo_dataset_regenerates_after_interruption_or_version_change(tmp_path):
    root = tmp_path / "demo"
    manifest = ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    manifest.unlink()  # as if the previous run died before writing the manifest
    ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    assert len(load_manifest(manifest)) == 6
    params = manifest.parent / "params.json"
    params.write_text(params.read_text().replace('"version": 1', '"version": 0'))  # an older synthesis
    (manifest.parent / "clips" / "tone" / "tone_00099.wav").write_bytes(b"stale")
    ensure_demo_dataset(root, num_clips=6, sample_rate=8000, seconds=0.25)
    assert len(list((manifest.parent / "clips").rglob("*.wav"))) == 6  # stale clips removed


def test_default_root_uses_asit_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    manifest = ensure_demo_dataset(num_clips=6, sample_rate=8000, seconds=0.1)
    assert manifest == tmp_path / "cache" / "demo" / "n6-sr8000-0.1s-seed0" / "manifest.csv"


def test_demo_cpu_recipe_corpus_is_at_the_documented_path(tmp_path, monkeypatch):
    """README and docs name this folder for the probe commands after ``scripts/pretrain.py``."""
    from asit.config import load_config

    monkeypatch.setenv("ASIT_CACHE", str(tmp_path))
    d, t = load_config("demo_cpu").data, load_config("demo_cpu").train
    path = demo_dataset_dir(num_clips=d.demo_clips, sample_rate=d.sample_rate, seconds=d.demo_seconds, seed=t.seed)
    assert path == tmp_path / "demo" / "n240-sr16000-3s-seed0"
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    assert "~/.cache/asit/demo/n240-sr16000-3s-seed0/manifest.csv" in readme


def test_full_size_generation_is_fast(tmp_path):
    start = time.perf_counter()
    manifest = ensure_demo_dataset(tmp_path / "full")
    assert time.perf_counter() - start < 20.0
    assert len(load_manifest(manifest)) == 240
