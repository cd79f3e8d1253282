"""End to end: pretrain a small ASiT on the demo corpus, export the teacher, linear-probe it, and
compare with the same probe on a randomly initialised encoder of the same architecture (the very
weights pretraining started from)."""

from __future__ import annotations

import time

import pytest

from asit.config import load_config
from asit.data import ensure_demo_dataset
from asit.eval.linear_probe import ProbeConfig, probe_encoder
from asit.train import Pretrainer

CHANCE = 1 / 6
# The README's demo recipe as shipped (demo_cpu: 240 clips of 3 s, 16 kHz, 4-block 128-wide ViT, 600 steps,
# ~200 s on 2 cores). Its settings were chosen so that this short run learns: 128 prototypes per head, a
# peak lr of 3e-2 x 16/256, and four 1 s local views in the [CLS] loss (ASiT v2's all-pairs global loss).
# Figures (5-fold accuracy, pretrained against random init, both poolings): bench/RESULTS.md.


@pytest.mark.slow
def test_pretraining_beats_random_init_in_a_linear_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    manifest = ensure_demo_dataset(tmp_path / "cache" / "demo", num_clips=240, sample_rate=16000, seconds=3.0,
                                   seed=0)
    cfg = load_config("demo_cpu", [
        f"train.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.num_workers=0",
        "data.demo_clips=240", "train.device=cpu", "train.progress=false", "train.image_every_epochs=0",
        "train.seed=0",
    ])
    started = time.time()
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
    pretrain_s = time.time() - started

    results = {}
    for pool in ("tokens", "cls"):
        common = dict(cache_dir=tmp_path / "emb", cfg=ProbeConfig(folds=5, seed=0), progress=False, pool=pool)
        results[pool] = (probe_encoder(summary["encoder"], manifest, **common),
                         probe_encoder(summary["encoder"], manifest, random_init=True, init_seed=0, **common))
    print(f"{summary['steps']} pretraining steps in {pretrain_s:.0f} s; 5-fold accuracy, 240 clips, 6 classes:")
    for pool, (trained, random) in results.items():
        print(f"  {pool:>6} pooling: pretrained {trained['mean']:.3f} ± {trained['std']:.3f}, "
              f"random init {random['mean']:.3f} ± {random['std']:.3f}")

    gaps = {pool: trained["mean"] - random["mean"] for pool, (trained, random) in results.items()}
    for trained, random in results.values():
        assert trained["num_clips"] == random["num_clips"] == 240
        assert random["mean"] > 2 * CHANCE  # the baseline is a real one, not a broken encoder
        assert trained["embeddings"] != random["embeddings"]
    assert summary["steps"] == 600
    assert all(gap > 0 for gap in gaps.values()), gaps
    assert sum(gaps.values()) / len(gaps) > 0.05, gaps
