"""asit.train.report: the end of a run names what it made and the commands to use it, with this run's paths."""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

import torch
from tiny_config import TINY_MODEL

from asit.config import load_config
from asit.train import Pretrainer
from asit.train.report import next_steps, probe_manifest


def test_demo_run_probes_the_demo_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    cfg = load_config("demo_cpu")
    manifest = tmp_path / "cache" / "demo" / "n240-sr16000-3s-seed0" / "manifest.csv"
    assert probe_manifest(cfg) == str(manifest)
    (tmp_path / "run" / "images").mkdir(parents=True)
    text = next_steps(cfg, tmp_path / "run", tmp_path / "run" / "teacher_encoder.safetensors")
    probe = next(line for line in text.splitlines() if "linear_probe.py" in line)
    assert shlex.split(probe) == ["python", "scripts/linear_probe.py", "--encoder",
                                  str(tmp_path / "run" / "teacher_encoder.safetensors"), "--manifest", str(manifest)]
    assert f"python scripts/plot.py {tmp_path / 'run' / 'log.jsonl'}" in text
    assert f"pictures: {tmp_path / 'run' / 'images'}/epoch_NNNN.png" in text
    assert "reconstruction in the masked area" in text and str(tmp_path / "run" / "probe.json") in text


def test_cache_dir_seed_shards_manifests_and_quoting(tmp_path):
    cfg = load_config("demo_cpu", [f"data.cache_dir={tmp_path}", "train.seed=3", "data.demo_clips=60"])
    assert probe_manifest(cfg) == str(tmp_path / "demo" / "n60-sr16000-3s-seed3" / "manifest.csv")
    shards = load_config("demo_cpu", ["data.train_manifest=shards:/data/shards"])
    text = next_steps(shards, tmp_path, tmp_path / "e.safetensors")
    assert probe_manifest(shards) is None and "--manifest LABELLED_MANIFEST" in text
    assert "pictures:" not in text  # no images folder
    spaced = load_config("demo_cpu", ["data.train_manifest=/data/my corpus.csv"])
    text = next_steps(spaced, tmp_path, tmp_path / "e.safetensors")
    assert "--manifest '/data/my corpus.csv'" in text
    home = next_steps(load_config("demo_cpu"), Path.home() / "runs" / "x", Path.home() / "runs" / "x" / "e.safetensors")
    assert "--encoder ~/runs/x/e.safetensors" in home


def test_a_run_ends_with_its_next_steps_and_counts_epochs_from_1(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config("demo_cpu", [*TINY_MODEL, "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=1",
                                   "train.log_every=1", "train.progress=false", f"train.output_dir={tmp_path / 'run'}"])
    trainer = Pretrainer(cfg)
    try:
        with caplog.at_level(logging.INFO, logger="asit"):
            trainer.setup()
            trainer.train()
    finally:
        trainer.cleanup()
        torch.set_num_threads(threads)
    text = caplog.text
    manifest = tmp_path / "cache" / "demo" / "n48-sr16000-3s-seed0" / "manifest.csv"
    assert f"demo corpus (48 clips): {manifest}" in text
    assert f"--manifest {manifest}" in text and f"encoder:  {tmp_path / 'run' / 'teacher_encoder.safetensors'}" in text
    assert "python scripts/plot.py" in text and "pictures:" in text
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "run" / "images").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]

