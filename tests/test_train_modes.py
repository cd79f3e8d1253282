"""Fast and authors training modes: the authors' step shape (per-sample CPU GMML in the loader, naive
attention, eager reference losses, host-read clipping, per-tensor EMA, for-loop AdamW) computing what
the fast step computes, the old name ``reference`` read as ``authors``, the EMA variants, and the
compiled fast path matching the eager one."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from test_train_engine import TINY, _env  # noqa: F401  (module fixture: temp ASIT_CACHE, 1 thread)

from asit.config import ConfigError, load_config, rename_old_keys
from asit.data import collate_pretrain
from asit.data.gmml_cpu import ReferenceGMMLCollate, gmml_per_sample
from asit.models.vit import NaiveAttention
from asit.train import Pretrainer


def _trainer(tmp_path, *extra: str) -> Pretrainer:
    trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path}", *extra]))
    trainer.setup()
    return trainer


def _batch(trainer: Pretrainer) -> dict:
    trainer.step = trainer.iters_per_epoch  # past the 1-epoch warm-up, where lr starts at 0
    return next(iter(trainer.loader))


@pytest.mark.parametrize("alien_prob", [0.0, 1.0])
def test_per_sample_gmml_covers_target_and_never_copies_itself(alien_prob):
    views = torch.randn(5, 1, 40, 24)
    corrupted, mask = gmml_per_sample(views, random.Random(3), alien_prob=alien_prob)
    cover = mask.float().mean((1, 2, 3))
    low = 0.3 if alien_prob == 1.0 else 0.5
    assert bool((cover >= low - 1e-6).all()), cover
    assert torch.equal(corrupted[~mask.expand_as(views)], views[~mask.expand_as(views)])
    if alien_prob == 0.0:
        assert bool((corrupted[mask.expand_as(views)] == 0).all())
    else:  # every corrupted pixel comes from some *other* sample at the same position
        for i in range(5):
            m = mask[i, 0]
            same = [j for j in range(5) if j != i and torch.equal(corrupted[i, 0][m], views[j, 0][m])]
            assert same, f"sample {i} was not filled from another sample"


def test_reference_collate_adds_view_major_corruption():
    samples = [{"views": torch.randn(2, 1, 32, 32), "label": torch.zeros(0), "index": i, "ok": True, "error": ""}
               for i in range(4)]
    collate = ReferenceGMMLCollate(collate_pretrain, seed=0, patch_size=16)
    a, b = collate(samples), collate(samples)
    assert a["corrupted"].shape == (8, 1, 32, 32) and a["mask"].dtype == torch.bool
    assert a["token_fraction"].shape == (8, 4)
    assert torch.equal(a["corrupted"], b["corrupted"])  # seeded by the clip indices, not worker timing
    pooled = a["mask"].float().reshape(8, 2, 16, 2, 16).mean((2, 4)).flatten(1)
    torch.testing.assert_close(a["token_fraction"], pooled)


def test_authors_mode_trains_with_loader_side_gmml(tmp_path):
    trainer = _trainer(tmp_path, "train.mode=authors", "train.device=cpu")
    try:
        assert trainer.precision == "fp32" and not trainer.compiled  # fp16 + scaler only on CUDA
        assert trainer.loss_fn.backend == "reference"
        assert all(type(b.attn) is NaiveAttention for b in trainer.student.backbone.blocks)
        assert trainer.pair.ema == "per_tensor"
        assert trainer.optimizer.defaults["foreach"] is False and trainer.optimizer.defaults["fused"] is False
        batch = _batch(trainer)
        assert "corrupted" in batch and batch["corrupted"].shape[0] == 2 * batch["views"].shape[0]
        before = trainer.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
        result = trainer.train_step(batch, epoch=1)
        assert not result.skipped and torch.isfinite(result.terms["loss"])
        assert not torch.equal(before, trainer.student.backbone.blocks[0].attn.qkv.weight)
    finally:
        trainer.cleanup()


def test_reference_is_read_as_authors_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="asit.config"):
        cfg = load_config("demo_cpu", ["train.mode=reference"])
    assert cfg.train.mode == "authors"
    assert "train.mode=authors" in caplog.text


def test_old_mode_name_in_a_checkpoint_config_is_renamed():
    saved = {"train": {"mode": "reference", "epochs": 3}, "model": {}}
    assert rename_old_keys(saved) == {"train": {"mode": "authors", "epochs": 3}, "model": {}}
    assert rename_old_keys({"train": {"mode": "fast"}}) == {"train": {"mode": "fast"}}


def test_compile_in_authors_mode_is_rejected(tmp_path):
    trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path}", "train.mode=authors",
                                                  "train.compile=true"]))
    with pytest.raises(ValueError, match="train.compile"):
        trainer.setup()
    trainer.cleanup()


def test_unknown_mode_is_rejected():
    with pytest.raises(ConfigError, match="train.mode"):
        load_config("demo_cpu", ["train.mode=turbo"])


def test_fast_and_authors_steps_agree(tmp_path):
    """Same weights, same batch, same GMML masks (the authors' loader corrupts it; both steps read them):
    the loss terms, the clipped gradients, the AdamW update, the teacher's EMA and the centres agree in
    fp32, although attention, clipping, AdamW and EMA run by different code."""
    common = ("train.device=cpu", "train.precision=fp32", "model.drop_path_rate=0.0",
              "optim.clip_grad=0.05")  # small enough that the per-parameter clip acts
    authors = _trainer(tmp_path / "authors", *common, "train.mode=authors")
    fast = _trainer(tmp_path / "fast", *common, "train.mode=fast")
    try:
        assert type(authors.student.backbone.blocks[0].attn) is NaiveAttention
        assert type(fast.student.backbone.blocks[0].attn) is not NaiveAttention
        assert (authors.pair.ema, fast.pair.ema) == ("per_tensor", "foreach")
        for a, f in zip(authors.student.parameters(), fast.student.parameters(), strict=True):
            assert torch.equal(a, f)
        batch = _batch(authors)
        fast.step = authors.step
        assert "corrupted" in batch
        r_a = authors.train_step(batch, epoch=1)
        r_f = fast.train_step(batch, epoch=1)
        for key in ("loss", "global", "local", "recon", "grad_norm"):
            torch.testing.assert_close(r_a.terms[key], r_f.terms[key], rtol=1e-5, atol=1e-6)
        clipped = 0
        named_f = dict(fast.student.named_parameters())
        for name, p in authors.student.named_parameters():
            q = named_f[name]
            assert (p.grad is None) == (q.grad is None), name
            if p.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
                clipped += bool(p.grad.norm() < 0.05 * (1 + 1e-3) and p.grad.norm() > 0.05 * (1 - 1e-3))
            # AdamW's first step is about lr·sign(g): a gradient near its eps turns a 1e-7 difference into
            # a few percent of lr (3e-5 here) on a rare element
            torch.testing.assert_close(p, q, rtol=1e-5, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")
        assert clipped > 0  # some gradients were clipped to the threshold
        for a, f in zip(authors.teacher.parameters(), fast.teacher.parameters(), strict=True):
            torch.testing.assert_close(a, f, rtol=1e-5, atol=1e-7)  # (1 - m)·student: the AdamW gap shrunk
        torch.testing.assert_close(authors.loss_fn.center_local, fast.loss_fn.center_local, rtol=1e-5, atol=1e-7)
    finally:
        authors.cleanup()
        fast.cleanup()


def test_teacher_bf16_copy_follows_the_teacher(tmp_path):
    trainer = _trainer(tmp_path, "train.device=cpu", "train.precision=bf16", "train.teacher_bf16=true",
                       "train.ema=fused")
    try:
        copy = trainer.pair.teacher_copy
        assert copy is not None and trainer.teacher_forward is copy
        assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
        assert "teacher_copy" not in "".join(trainer.pair.state_dict())  # not saved
        result = trainer.train_step(_batch(trainer), epoch=1)
        assert not result.skipped
        for t, c in zip(trainer.teacher.parameters(), copy.parameters(), strict=True):
            assert torch.equal(t.to(torch.bfloat16), c)
    finally:
        trainer.cleanup()


def test_teacher_bf16_needs_bf16(tmp_path):
    with pytest.raises(ConfigError, match="train.teacher_bf16"):
        load_config("demo_cpu", ["train.teacher_bf16=true", "train.precision=fp32"])
    trainer = Pretrainer(load_config("demo_cpu", [*TINY, f"train.output_dir={tmp_path}", "train.device=cpu",
                                                  "train.teacher_bf16=true"]))  # auto: fp32 on the CPU
    with pytest.raises(ValueError, match="train.teacher_bf16"):
        trainer.setup()
    trainer.cleanup()


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    """The compiled student/teacher give the same losses and updates as eager on the same batch."""
    # on the GPU machine this compiles for CUDA (fp32 so that eager and compiled agree closely)
    common = ("model.drop_path_rate=0.0", "train.precision=fp32")
    eager = _trainer(tmp_path / "eager", *common, "train.compile=false")
    compiled = _trainer(tmp_path / "compiled", *common, "train.compile=true")
    try:
        assert compiled.compiled and not eager.compiled
        batch = _batch(eager)
        compiled.step = eager.step
        before = eager.student.backbone.blocks[1].mlp.fc2.weight.detach().clone()
        for t in (eager, compiled):
            t.gmml_gen.manual_seed(7)
        r_e = eager.train_step(batch, epoch=1)
        r_c = compiled.train_step(batch, epoch=1)
        for key in ("loss", "global", "local", "recon"):
            torch.testing.assert_close(r_c.terms[key], r_e.terms[key], rtol=1e-4, atol=1e-5)
        w_e = eager.student.backbone.blocks[1].mlp.fc2.weight
        w_c = compiled.student.backbone.blocks[1].mlp.fc2.weight
        assert not torch.equal(w_e, before)  # the step did update the weights
        torch.testing.assert_close(w_c, w_e, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(compiled.loss_fn.center_local, eager.loss_fn.center_local, rtol=1e-4, atol=1e-6)
    finally:
        eager.cleanup()
        compiled.cleanup()
