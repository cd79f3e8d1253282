"""Unreadable clips are skipped and counted; more than ``data.max_bad_fraction`` of them stops the run."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from test_train_engine import TINY, _env  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)

from asit.config import load_config
from asit.train import BadDataError, Pretrainer


def _corpus(root, good: int, bad: int):
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(good):
        sf.write(root / f"good{i:02d}.wav", (0.3 * rng.standard_normal(16000)).astype("float32"), 16000)
    for i in range(bad):
        (root / f"bad{i:02d}.wav").write_bytes(rng.bytes(300))  # not audio at all
    return root


def _run(tmp_path, data, *extra):
    cfg = load_config("demo_cpu", [*TINY, f"data.train_manifest={data}", f"train.output_dir={tmp_path / 'run'}",
                                   "train.epochs=1", *extra])
    trainer = Pretrainer(cfg)
    try:
        trainer.setup()
        trainer.train()
        return trainer
    finally:
        trainer.cleanup()


def test_too_many_bad_clips_stop_the_run(tmp_path):
    data = _corpus(tmp_path / "wavs", good=16, bad=8)
    with pytest.raises(BadDataError, match=r"data.max_bad_fraction=0.05"):
        _run(tmp_path, data, "data.max_bad_fraction=0.05")


def test_bad_clips_under_the_limit_are_skipped_and_counted(tmp_path):
    data = _corpus(tmp_path / "wavs", good=16, bad=8)
    trainer = _run(tmp_path, data, "data.max_bad_fraction=0.6")
    assert trainer.step == 3  # the epoch ran to its end
    assert sum(trainer.bad_inputs.values()) > 0  # and the unreadable clips it met were counted by reason
    assert all(isinstance(reason, str) and reason for reason in trainer.bad_inputs)
