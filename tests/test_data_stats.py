"""Streaming fbank statistics against a direct computation; the compute_stats script end to end."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from asit.config import load_config
from asit.data import AudioEntry, kaldi_fbank, load_audio
from asit.data.stats import RunningStats, compute_fbank_stats

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compute_stats.py"
SR = 16000


def _corpus(tmp_path, rates=(16000, 22050, 8000, 16000)):
    rng = np.random.default_rng(0)
    entries = []
    for i, rate in enumerate(rates):
        n = int(rate * (0.3 + 0.4 * i))  # different lengths
        t = np.arange(n) / rate
        clip = 0.2 * (i + 1) * np.sin(2 * np.pi * (300 + 200 * i) * t) + 0.05 * rng.standard_normal(n)
        path = tmp_path / f"clip{i}.wav"
        sf.write(path, clip.astype(np.float32), rate)
        entries.append(AudioEntry(str(path)))
    return entries


def _direct(entries, sample_rate, bins):
    values = torch.cat([
        kaldi_fbank(w, sample_rate, bins, target_frames=10**6)[: _frames(w, sample_rate)].reshape(-1)
        for w in (load_audio(e.path, sample_rate) for e in entries)
    ]).double()
    return values.mean().item(), values.std(unbiased=False).item(), values.numel() // bins


def _frames(wave, sr):
    size, shift = int(sr * 0.025), int(sr * 0.01)
    return 1 if wave.numel() < size else 1 + (wave.numel() - size) // shift


def test_matches_direct_computation_and_skips_bad_files(tmp_path):
    entries = _corpus(tmp_path)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 20)
    (tmp_path / "silence.wav").write_bytes(b"")
    bad = [AudioEntry(str(tmp_path / "junk.wav")), AudioEntry(str(tmp_path / "silence.wav")),
           AudioEntry(str(tmp_path / "gone.wav"))]
    mixed = entries[:2] + bad + entries[2:]
    stats = compute_fbank_stats(mixed, sample_rate=SR, num_mel_bins=40, progress=False)
    mean, std, frames = _direct(entries, SR, 40)
    assert stats.clips == 4 and stats.frames == frames
    assert math.isclose(stats.mean, mean, rel_tol=1e-6) and math.isclose(stats.std, std, rel_tol=1e-6)
    assert stats.skipped == {"unreadable": 1, "empty": 1, "missing": 1}
    assert [m.split(" (")[0] for m in stats.skipped_files] == [f"{b.path}: {r}" for b, r in
                                                                zip(bad, ["unreadable", "empty", "missing"])]


def test_compute_stats_script_names_each_skipped_file(tmp_path, capsys):
    script = _script()
    _corpus(tmp_path)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 20)
    (tmp_path / "silence.wav").write_bytes(b"")
    assert script.main([str(tmp_path), "--sample-rate", str(SR), "--num-mel-bins", "32", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"# skipped {tmp_path / 'junk.wav'}: unreadable" in err
    assert f"# skipped {tmp_path / 'silence.wav'}: empty (0-byte file)" in err
    assert "# skipped 2 clips (empty: 1, unreadable: 1)" in err


def test_max_clips_and_workers_give_the_same_numbers(tmp_path):
    entries = _corpus(tmp_path)
    first_two = compute_fbank_stats(entries, sample_rate=SR, num_mel_bins=32, max_clips=2, progress=False)
    mean, std, _ = _direct(entries[:2], SR, 32)
    assert first_two.clips == 2 and math.isclose(first_two.mean, mean, rel_tol=1e-6)
    serial = compute_fbank_stats(entries, sample_rate=SR, num_mel_bins=32, progress=False)
    parallel = compute_fbank_stats(entries, sample_rate=SR, num_mel_bins=32, num_workers=2, progress=False)
    assert math.isclose(serial.mean, parallel.mean, rel_tol=1e-12)
    assert math.isclose(serial.std, parallel.std, rel_tol=1e-12)


def test_running_stats_merge_in_any_chunks():
    values = torch.randn(10_000, dtype=torch.float64) * 3 - 4
    a, b = RunningStats(), RunningStats()
    a.update(values)
    for chunk in torch.split(values[torch.randperm(values.numel())], 777):
        b.update(chunk)
    for s in (a, b):
        assert math.isclose(s.mean, values.mean().item(), rel_tol=1e-12)
        assert math.isclose(s.std, values.std(unbiased=False).item(), rel_tol=1e-12)
    assert math.isnan(RunningStats().std)


def test_errors(tmp_path):
    (tmp_path / "junk.wav").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 clips"):
        compute_fbank_stats([AudioEntry(str(tmp_path / "junk.wav"))], progress=False)
    with pytest.raises(ValueError, match="max_clips"):
        compute_fbank_stats(_corpus(tmp_path), max_clips=0, progress=False)


def test_script_prints_overrides_that_keep_the_recipe(tmp_path):
    entries = _corpus(tmp_path)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path\n" + "".join(Path(e.path).name + "\n" for e in entries))
    out = tmp_path / "stats.yaml"
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(manifest), "--config", "asit_v2_vit_base", "--num-mel-bins", "40",
         "--max-clips", "3", "--no-progress", "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    fragment = yaml.safe_load(out.read_text())
    mean, std, _ = _direct(entries[:3], SR, 40)  # the v2 recipe's 16 kHz, --num-mel-bins 40
    assert math.isclose(fragment["data"]["mean"], mean, abs_tol=1e-6)
    assert math.isclose(fragment["data"]["std"], std, abs_tol=1e-6)
    (line,) = [x for x in run.stdout.splitlines() if x.startswith("# train with:")]
    assert "--config asit_v2_vit_base" in line
    overrides = [word for word in line.split() if word.startswith("data.")]
    cfg = load_config("asit_v2_vit_base", overrides)  # the printed overrides keep the recipe's other keys
    assert cfg.data.sample_rate == 16000 and cfg.data.local_views == 4
    assert math.isclose(cfg.data.mean, mean, abs_tol=1e-6) and math.isclose(cfg.data.std, std, abs_tol=1e-6)
    assert "not as --config" in out.read_text()


def _script():
    spec = importlib.util.spec_from_file_location("compute_stats_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args,flag", [(["--sample-rate", "0"], "--sample-rate"),
                                       (["--config", "asit_v2_vit_base", "--num-mel-bins", "0"], "--num-mel-bins"),
                                       (["--sample-rate", "-16000"], "--sample-rate"),
                                       (["--max-clips", "0"], "--max-clips"),
                                       (["--num-workers", "-1"], "--num-workers")])
def test_script_rejects_zero_or_negative_settings(tmp_path, capsys, args, flag):
    entries = _corpus(tmp_path, rates=(16000,))
    with pytest.raises(SystemExit) as info:  # 0 used to fall back to the recipe's value silently
        _script().main([entries[0].path.rsplit("/", 1)[0], *args, "--no-progress"])
    assert info.value.code == 2 and f"{flag} must be >=" in capsys.readouterr().err
