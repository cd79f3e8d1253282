"""The sync-free training step (``train.sync_free``): GMML from a fixed candidate budget, the
non-finite guard decided on the device, and nothing read back to the host inside the step.

On the CPU "read back" is checked with :class:`host_reads.HostReads`, which records every tensor
operation that would make the host wait for a CUDA device; on a GPU the same step runs under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import pytest
import torch
from host_reads import HostReads
from test_train_engine import (  # noqa: F401  (_env: module fixture, temp ASIT_CACHE and 1 thread)
    STEPS_PER_EPOCH,
    CrashingPretrainer,
    Interrupted,
    _env,
    _frozen_state,
    _inject_nan,
    assert_states_equal,
    read_log,
    run,
    tiny_config,
)

import asit.data.fbank as fbank
import asit.ops as ops
import asit.train.engine as engine
import asit.train.losses as losses
from asit.config import ConfigError
from asit.train import NonFiniteLossError, Pretrainer
from asit.train.checkpoint import load_checkpoint

SYNC_FREE = ("train.sync_free=true", "optim.warmup_epochs=0")


def _trainer(tmp_path, *extra: str) -> Pretrainer:
    trainer = Pretrainer(tiny_config(tmp_path, *SYNC_FREE, *extra))
    trainer.setup()
    trainer.batches = iter(trainer.loader)
    return trainer


@pytest.fixture
def trainer(tmp_path):
    t = _trainer(tmp_path)
    yield t
    t.cleanup()


# ------------------------------------------------------------------ the sampler


def test_budget_sampler_reads_nothing_back_and_keeps_the_shortest_covering_prefix() -> None:
    g = torch.Generator().manual_seed(3)
    h, w = 77, 45
    with HostReads() as reads:
        blocks = ops.sample_gmml_blocks(9, h, w, generator=g, budget=96)
    assert reads.reads == []
    assert blocks.boxes.shape == (9, 96, 4)
    need = blocks.target * float(h * w)
    for b in range(9):
        used = int((blocks.boxes[b, :, 2] > 0).sum())
        assert used >= 1 and bool((blocks.boxes[b, used:] == 0)[:, 2:].all())  # unused slots blanked
        full = ops.paint_block_mask(blocks.boxes[b : b + 1, :used], h, w).sum()
        shorter = ops.paint_block_mask(blocks.boxes[b : b + 1, : used - 1], h, w).sum()
        assert full >= need[b] > shorter  # reaches the target, one block fewer does not


def test_budget_shortfall_is_flagged_per_sample() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(12, 1, 48, 32)
    blocks = ops.sample_gmml_blocks(12, 48, 32, generator=g, budget=2)  # far too few blocks
    out = ops.gmml_corrupt(x, blocks, 16)
    short = ops.gmml_shortfall(out.mask, blocks.target)
    covered = out.mask.flatten(1).double().mean(1)
    assert torch.equal(short, covered < blocks.target.double())
    assert short.any() and bool((blocks.boxes[short, :, 2] > 0).all())  # a short sample keeps every block


def test_centre_update_builds_nothing_from_host_data() -> None:
    """``update_center_`` with a Python count fills it on the device (was a blocking host-to-device copy)."""
    center, total = torch.zeros(8), torch.randn(8)
    with HostReads() as reads:
        ops.update_center_(center, total, count=5, momentum=0.9)
    assert reads.reads == []
    torch.testing.assert_close(center, 0.1 * total / 5)


@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_bad_budget_is_rejected(budget) -> None:
    with pytest.raises(ValueError, match="budget"):
        ops.sample_gmml_blocks(4, 16, 16, budget=budget)


@pytest.mark.parametrize("extra, match", [
    (("train.mode=reference",), "train.sync_free=true contradicts train.mode=authors"),
    (("train.precision=fp16",), "train.sync_free=true needs train.precision bf16 or fp32"),
    (("gmml.candidate_budget=0",), "gmml.candidate_budget"),
])
def test_sync_free_config_errors(tmp_path, extra, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, "train.sync_free=true", *extra)


# ------------------------------------------------------------------ the step


@pytest.mark.parametrize("fbank_on", ["loader", "device"])
def test_sync_free_step_reads_nothing_back(tmp_path, monkeypatch, fbank_on) -> None:
    """Nothing in the step waits for the device, except inside the fused ops, whose CUDA path is a
    Triton kernel (their CPU reference, which this test runs, may read back). With the fbank on the
    device, the step starts from waveform crops and the fbank reads nothing back either."""
    for module, name in ((engine, "gmml_corrupt"), (losses, "centered_softmax_cross_entropy"),
                         (losses, "masked_l1_loss")):
        monkeypatch.setattr(module, name, HostReads.allow(getattr(module, name)))
    # the fbank's CPU path finishes in NumPy; check the pure-torch path that CUDA runs
    monkeypatch.setattr(fbank, "_NUMPY_ON_CPU", False)
    trainer = _trainer(tmp_path, f"data.fbank_on={fbank_on}")
    try:
        trainer.train_step(next(trainer.batches), epoch=0)  # first step: optimiser state is created
        batch = next(trainer.batches)
        assert ("waves" in batch) == (fbank_on == "device")
        before = trainer.student.backbone.cls_token.detach().clone()
        with HostReads() as reads:
            result = trainer.train_step(batch, epoch=0)
        assert reads.reads == []
        assert not result.skipped  # (read after the step)
        assert not torch.equal(trainer.student.backbone.cls_token, before)
    finally:
        trainer.cleanup()


def test_the_same_step_checked_on_the_host_does_read_back(tmp_path) -> None:
    """The detector is not blind: the default (per-step) guard reads the flags every step."""
    trainer = Pretrainer(tiny_config(tmp_path, "train.sync_free=false"))
    trainer.setup()
    try:
        batch = next(iter(trainer.loader))
        with HostReads() as reads:
            trainer.train_step(batch, epoch=0)
        assert any(name == "tolist" for name, _ in reads.reads)
    finally:
        trainer.cleanup()


@pytest.mark.parametrize("mode, expected", [("mul", ["local", "grad_norm"]), ("add", ["local"])])
def test_sync_free_skip_is_exact_and_reported_later(trainer, monkeypatch, mode, expected) -> None:
    _inject_nan(monkeypatch, bad_calls={2}, mode=mode)
    assert not trainer.train_step(next(trainer.batches), epoch=0).skipped
    before = _frozen_state(trainer)
    adam = {id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()}
    bad = trainer.train_step(next(trainer.batches), epoch=0)
    assert trainer.guard.nonfinite_total == 0  # not read back yet
    assert bad.skipped and bad.nonfinite == expected
    assert trainer.step == 2
    assert_states_equal(_frozen_state(trainer), before)  # student, teacher and centres untouched
    for p, state in trainer.optimizer.state.items():  # moments and step counts too
        assert_states_equal(state, adam[id(p)])
    trainer.guard.sync(trainer.step)
    assert (trainer.guard.nonfinite_total, trainer.guard.nonfinite_consecutive) == (1, 1)
    trainer.writer.flush()
    event = read_log(trainer.run_dir)[-1]
    assert event["event"] == "nonfinite_skip" and event["nonfinite"] == expected
    assert event["skipped_steps"] == 1 and event["step"] == 2
    assert not trainer.train_step(next(trainer.batches), epoch=0).skipped
    trainer.guard.sync(trainer.step)
    assert (trainer.guard.nonfinite_total, trainer.guard.nonfinite_consecutive) == (1, 0)
    after = _frozen_state(trainer)
    assert not torch.equal(after["s.backbone.cls_token"], before["s.backbone.cls_token"])
    assert not torch.equal(after["t.backbone.cls_token"], before["t.backbone.cls_token"])
    assert not torch.equal(after["c.global"], before["c.global"])
    assert trainer.state_dict()["nonfinite"] == {"total": 1, "consecutive": 0}


@pytest.mark.parametrize("log_every, noticed", [(1, 4), (10, 6)])
def test_sync_free_stop_after_consecutive_skips(tmp_path, monkeypatch, log_every, noticed) -> None:
    """A run of skipped steps reaching the limit stops the run at the next read: the next log
    interval, or the epoch end (3 steps per epoch), whichever comes first."""
    _inject_nan(monkeypatch, bad_calls=None)
    trainer = Pretrainer(tiny_config(tmp_path, *SYNC_FREE, "train.max_consecutive_nonfinite=4",
                                     f"train.log_every={log_every}", "train.image_every_epochs=0"))
    trainer.setup()
    start = _frozen_state(trainer)
    try:
        with pytest.raises(NonFiniteLossError, match=rf"\d consecutive steps.*noticed at step {noticed}"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert trainer.step == noticed and trainer.guard.nonfinite_total == noticed
    assert_states_equal(_frozen_state(trainer), start)
    events = [r for r in read_log(tmp_path) if r.get("event") == "nonfinite_skip"]
    assert sum(e["skipped_steps"] for e in events) == noticed
    assert not [r for r in read_log(tmp_path) if "event" not in r]  # nothing logged as a normal step


def test_sync_free_run_resumes_exactly(tmp_path, monkeypatch) -> None:
    """A run that crashes mid-epoch 1 and resumes ends equal to an uninterrupted one, with a skipped
    (NaN) step before the crash: weights, centres, optimiser state, skip counter and log."""
    # on the CPU even on a GPU machine: bitwise equality of two runs needs deterministic reductions
    common = (*SYNC_FREE, "train.image_every_epochs=0", "train.checkpoint_every_steps=2", "train.device=cpu")
    cfg = dict(straight=tiny_config(tmp_path / "straight", *common), split=tiny_config(tmp_path / "split", *common))
    calls = _inject_nan(monkeypatch, bad_calls={2, 2 * STEPS_PER_EPOCH + 2})  # step 2 of each run
    run(Pretrainer(cfg["straight"]))
    crashing = CrashingPretrainer(cfg["split"])
    crashing.crash_at = STEPS_PER_EPOCH + 1
    with pytest.raises(Interrupted):
        run(crashing)
    assert calls[0] == 6 + STEPS_PER_EPOCH + 1
    resumed = Pretrainer(cfg["split"], resume=True)
    resumed.setup()
    try:
        assert resumed.guard.nonfinite_total == 1
        resumed.train()
    finally:
        resumed.cleanup()
    name = f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt"
    ref = load_checkpoint(tmp_path / "straight" / "checkpoints" / name)
    got = load_checkpoint(tmp_path / "split" / "checkpoints" / name)
    for key in ("student", "teacher", "loss"):
        assert_states_equal(got[key], ref[key])
    for k in ref["optimizer"]["state"]:
        assert_states_equal(got["optimizer"]["state"][k], ref["optimizer"]["state"][k])
    assert got["nonfinite"] == ref["nonfinite"] == {"total": 1, "consecutive": 0}
    assert got["gmml_shortfall"] == ref["gmml_shortfall"] == 0
    logged = [[(r["step"], r.get("loss"), r.get("event")) for r in read_log(tmp_path / d)] for d in cfg]
    assert logged[0] == logged[1] and (2, None, "nonfinite_skip") in logged[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: checks real device syncs")
def test_sync_free_step_on_cuda_never_syncs(tmp_path) -> None:
    trainer = Pretrainer(tiny_config(tmp_path, *SYNC_FREE, "train.device=cuda", "train.compile=false"))
    trainer.setup()
    try:
        assert trainer.sync_free
        batches = iter(trainer.loader)
        trainer.train_step(next(batches), epoch=0)  # warm-up: kernels compiled, optimiser state created
        batch = {k: v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in next(batches).items()}
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            result = trainer.train_step(batch, epoch=0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert not result.skipped
    finally:
        trainer.cleanup()


def test_expected_blocks_tracks_the_sampler() -> None:
    """The estimate behind the budget warning is in the right range of what the sampler draws."""
    g = torch.Generator().manual_seed(11)
    blocks = ops.sample_gmml_blocks(256, 592, 128, generator=g, zero_ratio=(0.7, 0.7), alien_prob=0.0)
    used = (blocks.boxes[..., 2] > 0).sum(1).double()
    estimate = ops.expected_gmml_blocks(592, 128, 0.7)
    assert 0.6 * float(used.median()) < estimate < float(used.median())  # borders make the real need larger
    assert ops.expected_gmml_blocks(592, 128, 0.7, max_block_frac=0.1) > 5 * estimate  # smaller blocks, more


def test_a_budget_too_small_for_the_block_settings_is_warned(tmp_path, caplog) -> None:
    trainer = Pretrainer(tiny_config(tmp_path, *SYNC_FREE, "gmml.candidate_budget=40",
                                     "gmml.max_block_frac=0.1"))
    with caplog.at_level("WARNING", logger="asit.train.engine"):
        trainer.setup()
    trainer.cleanup()
    assert "gmml.candidate_budget=40 may be too small" in caplog.text
