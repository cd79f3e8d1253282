"""End to end: pretrain a tiny ASiT on the demo corpus, export the teacher, linear-probe it, and
compare with the same probe on a randomly initialised encoder of the same architecture."""

from __future__ import annotations

import time

import pytest

from asit.config import load_config
from asit.data import ensure_demo_dataset
from asit.eval.linear_probe import ProbeConfig, probe_encoder
from asit.train import Pretrainer

CHANCE = 1 / 6


@pytest.mark.slow
def test_pretraining_then_linear_probe(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIT_CACHE", str(tmp_path / "cache"))
    manifest = ensure_demo_dataset(
        tmp_path / "cache" / "demo", num_clips=120, sample_rate=16000, seconds=3.0, seed=0
    )
    cfg = load_config(
        "demo_cpu",
        [
            f"train.output_dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.num_workers=0",
            "data.demo_clips=120",
            "train.epochs=5",
            "train.device=cpu",
            "train.progress=false",
            "train.image_every_epochs=0",
            "model.depth=2",
            "optim.lr=1.0e-2",
            "train.seed=0",
        ],
    )
    started = time.time()
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
    pretrain_s = time.time() - started

    probe = ProbeConfig(folds=5, seed=0)
    common = dict(cache_dir=tmp_path / "emb", cfg=probe, progress=False)
    trained = probe_encoder(summary["encoder"], manifest, **common)
    # init_seed = train.seed: the baseline starts from the very weights pretraining started from
    random = probe_encoder(summary["encoder"], manifest, random_init=True, init_seed=0, **common)
    numbers = (
        f"pretrained {trained['mean']:.3f} ± {trained['std']:.3f} vs random init "
        f"{random['mean']:.3f} ± {random['std']:.3f} (5-fold accuracy, 120 clips, 6 classes; "
        f"{summary['steps']} steps in {pretrain_s:.0f} s)"
    )
    print(numbers)

    # What holds robustly: the pipeline runs, both encoders are far above chance, and they differ.
    assert trained["num_clips"] == random["num_clips"] == 120
    assert trained["mean"] > 2 * CHANCE and random["mean"] > 2 * CHANCE
    assert trained["folds"] != random["folds"] or trained["embeddings"] != random["embeddings"]
    # What does not (yet) hold within a CPU test budget: measured over several budgets (21-210 steps,
    # lr 1e-3..3e-2, depth 2-4) pretrained and random-init probes stayed within one fold-std of each
    # other, sometimes one ahead, sometimes the other. Reported, not asserted.
    if trained["mean"] <= random["mean"]:
        pytest.xfail(f"pretraining did not beat random init in the test budget: {numbers}")
