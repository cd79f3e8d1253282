"""Unreadable clips are skipped and counted (over all ranks); more than ``data.max_bad_fraction`` of an
epoch's clips stops the run, on every rank together."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from test_train_engine import TINY, _env, read_log  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)

from asit.config import load_config
from asit.train import BadDataError, Pretrainer
from asit.train.bad_data import bad_fraction_error
from asit.train.checkpoint import checkpoint_path, load_checkpoint


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


def test_budget_rule_judges_the_epoch_not_a_prefix():
    """data.max_bad_fraction=0.05 on a 2M-clip epoch. The old rule judged the running rate after 100 clips, so
    a cluster of bad files early on (8 % of the first 6,400 clips) stopped runs whose epoch was at 3 %."""
    planned = 2_000_000
    assert bad_fraction_error({"unreadable": 512}, 6_400, planned, 0.05, epoch_done=False) is None
    assert bad_fraction_error({"unreadable": 60_000}, planned, planned, 0.05, epoch_done=True) is None  # 3 %
    # over the limit at the end of the epoch
    msg = bad_fraction_error({"unreadable": 100_001, "empty": 1}, planned, planned, 0.05, epoch_done=True)
    assert msg and "100002 of 2000000 clips (5.0%" in msg and "'unreadable': 100001" in msg
    # mid-epoch only once the budget is spent whatever the rest holds: bad > 0.05 * (planned + bad)
    spent = 105_264  # the first count with bad > 0.05 * (planned + bad)
    assert bad_fraction_error({"unreadable": spent - 1}, 150_000, planned, 0.05, epoch_done=False) is None
    assert "already more than" in bad_fraction_error({"unreadable": spent}, 150_000, planned, 0.05,
                                                      epoch_done=False)
    assert bad_fraction_error({}, 10, planned, 0.0, epoch_done=True) is None
    assert bad_fraction_error({"unreadable": 1}, 10, planned, 0.0, epoch_done=False)  # a limit of 0: at once
    assert bad_fraction_error({"unreadable": 10}, 10, 10, 1.0, epoch_done=True) is None  # 1: never


def _with_another_rank(trainer, per_batch_bad: int):
    """Simulate a second rank (in process, no process group) whose every batch holds ``per_batch_bad`` unreadable
    clips besides as many good ones as this rank's: its counts join each reduction of the bad-clip counts."""
    def gather(obj, group=None):
        bad, seen = obj
        return [obj, ({"unreadable": per_batch_bad * seen // 8} if seen else {}, seen + per_batch_bad * seen // 8)]

    trainer._gather = gather


def test_bad_clips_of_every_rank_are_logged_and_saved(tmp_path, caplog):
    """Rank 0's own data is clean; the other rank meets 2 unreadable clips per batch. The epoch log and the
    checkpoint count them (they held rank 0's counts only), and the run stays under the limit (6 of 54)."""
    cfg = load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path}", "train.epochs=1",
                                   "train.verify_replicas=false", "data.max_bad_fraction=0.2",
                                   "train.image_every_epochs=0"])
    trainer = Pretrainer(cfg)
    trainer.setup()
    _with_another_rank(trainer, per_batch_bad=2)
    try:
        with caplog.at_level("WARNING", logger="asit.train.engine"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert "epoch 1: skipped 6 of 54 clip(s)" in caplog.text
    assert load_checkpoint(checkpoint_path(tmp_path, 3))["bad_inputs"] == {"unreadable": 6}


def test_one_ranks_bad_clips_stop_every_rank(tmp_path):
    """The verdict comes from the all-rank counts, so rank 0 (clean data) raises too, at the first log step
    after the epoch's budget is spent (2 > 0.05 * (24 + 2)), instead of waiting in a collective; 18 clips
    were loaded by then (8 here, 10 there)."""
    cfg = load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path}", "train.epochs=1",
                                   "train.verify_replicas=false", "data.max_bad_fraction=0.05"])
    trainer = Pretrainer(cfg)
    trainer.setup()
    _with_another_rank(trainer, per_batch_bad=2)
    try:
        with pytest.raises(BadDataError, match=r"epoch 1: 2 clips \(of 18 loaded so far, all processes\)"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.step == 1


class StopsAfter(Pretrainer):
    """Stops the run right after the checkpoint of step ``stop_at`` is written (a crash)."""

    stop_at = -1

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.stop_at:
            raise KeyboardInterrupt
        return path


def test_mid_epoch_resume_keeps_the_epochs_bad_clip_counts(tmp_path):
    """A crash after the mid-epoch checkpoint of step 4 (epoch 2 of 3-step epochs), then a resume: the
    epoch's counts up to the crash come back from the checkpoint (they restarted at 0), so every later
    checkpoint counts the same unreadable clips as an uninterrupted run."""
    data = _corpus(tmp_path / "wavs", good=16, bad=8)
    overrides = [*TINY, f"data.train_manifest={data}", "train.epochs=2", "train.checkpoint_every_steps=2",
                 "data.max_bad_fraction=0.6", "train.image_every_epochs=0"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    for out, cls, resume in ((whole, Pretrainer, False), (cut, StopsAfter, False), (cut, Pretrainer, True)):
        trainer = cls(load_config("demo_cpu", [*overrides, f"train.output_dir={out}"]), resume=resume)
        trainer.stop_at = 4
        try:
            trainer.setup()
            trainer.train()
        except KeyboardInterrupt:
            assert out == cut and trainer.step == 4
        finally:
            trainer.cleanup()
    keys = ("bad_inputs", "epoch_bad_inputs", "epoch_seen")
    for step in (4, 6):
        a, b = (load_checkpoint(checkpoint_path(out, step)) for out in (whole, cut))
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, step
    mid = load_checkpoint(checkpoint_path(whole, 4))
    assert mid["epoch_seen"] == 8 and mid["epoch_bad_inputs"]  # one batch of epoch 2 (seed 0: 3 bad clips)
    final = load_checkpoint(checkpoint_path(whole, 6))
    assert sum(final["bad_inputs"].values()) == 16 and final["epoch_seen"] == 0  # 8 bad files, 2 epochs
