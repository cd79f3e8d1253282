"""The pretraining engine, in process (no torchrun): artefacts, EMA teacher, frozen output layers,
parameter groups, exact resume, the non-finite guard and a loss that falls.

Runs are tiny (2-layer 64-wide ViT on 96 x 32 spectrograms of the synthetic demo corpus, 3 steps
per epoch) and use one thread: on a shared 2-core machine oversubscribed threads slow these
small ops down by an order of magnitude.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_config import IMG, TINY_MODEL

from asit.config import ConfigError, load_config
from asit.train import NonFiniteLossError, Pretrainer
from asit.train.checkpoint import load_checkpoint
from asit.train.losses import ASiTLoss

TINY = [
    *TINY_MODEL,
    "train.batch_size=8", "train.epochs=2", "train.max_steps_per_epoch=3", "train.log_every=1",
    "train.progress=false",
]
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module", autouse=True)
def _env(tmp_path_factory):
    """Demo corpus in a temp dir (ASIT_CACHE) and a single intra-op thread for this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ASIT_CACHE", str(tmp_path_factory.mktemp("asit_cache")))
        yield
    torch.set_num_threads(threads)


def tiny_config(out_dir: Path, *extra: str):
    return load_config("demo_cpu", [*TINY, f"train.output_dir={out_dir}", *extra])


def last_layer_state(trainer: Pretrainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.last_layer_params]


def student_snapshot(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.student.state_dict().items()}


def teacher_snapshot(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.teacher.state_dict().items()}


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"differ: {different[:5]}"


def read_log(run_dir: Path) -> list[dict]:
    with open(run_dir / "log.jsonl", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


class RecordingPretrainer(Pretrainer):
    """Snapshots the output layers at the start and at each epoch end."""

    def setup(self) -> None:
        super().setup()
        self.snapshots = {"start": last_layer_state(self)}
        self.other_start = self.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
        self.centers_at_start = (self.loss_fn.center_global.clone(), self.loss_fn.center_local.clone())

    def _end_epoch(self, epoch) -> None:
        self.snapshots[epoch] = last_layer_state(self)
        if epoch == 0:
            self.other_after_epoch0 = self.student.backbone.blocks[0].attn.qkv.weight.detach().clone()
        super()._end_epoch(epoch)


class Interrupted(Exception):
    pass


class CrashingPretrainer(Pretrainer):
    """Simulates a crash right after the checkpoint of step ``crash_at`` was written."""

    crash_at = -1

    def save_checkpoint(self):
        path = super().save_checkpoint()
        if self.step == self.crash_at:
            raise Interrupted
        return path


def run(trainer: Pretrainer) -> dict:
    try:
        trainer.setup()
        return trainer.train()
    finally:
        trainer.cleanup()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-epoch run (the oracle for the resume tests)."""
    out = tmp_path_factory.mktemp("reference")
    trainer = RecordingPretrainer(tiny_config(out))
    summary = run(trainer)
    return trainer, summary, out


# --------------------------------------------------------------------------- artefacts


def test_run_writes_checkpoints_logs_images_and_config(reference) -> None:
    trainer, summary, out = reference
    total = 2 * STEPS_PER_EPOCH
    assert summary["steps"] == total and trainer.step == total
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint_*.pt"))
    assert ckpts == [f"checkpoint_{STEPS_PER_EPOCH:09d}.pt", f"checkpoint_{total:09d}.pt"]
    assert (out / "checkpoints" / f"rng_{total:09d}_rank0.pt").is_file()
    state = load_checkpoint(out / "checkpoints" / ckpts[-1])
    assert state["step"] == total and state["epoch"] == 2
    assert state["nonfinite"] == {"total": 0, "consecutive": 0} and state["scaler_overflows"] == 0

    records = read_log(out)
    assert [r["step"] for r in records] == list(range(1, total + 1))
    needed = {"loss", "global", "local", "recon", "grad_norm", "lr", "wd", "momentum", "teacher_temp",
              "teacher_entropy_cls", "teacher_entropy_tokens", "center_norm_cls", "center_norm_tokens"}
    for r in records:
        assert needed <= r.keys()
        assert all(math.isfinite(r[k]) for k in needed)
        assert 0.0 <= r["teacher_entropy_cls"] <= math.log(256) + 1e-4
        assert 0.0 <= r["teacher_entropy_tokens"] <= math.log(64) + 1e-4
        assert r["loss"] == pytest.approx(r["global"] + r["local"] + 2.0 * r["recon"], rel=1e-5)
    assert records[-1]["center_norm_cls"] > 0  # the centres moved
    assert records[0]["lr"] == 0.0 and records[1]["lr"] > 0  # warm-up from 0
    assert summary["first_loss"] == pytest.approx(records[0]["loss"])
    assert summary["last_loss"] == pytest.approx(records[-1]["loss"])

    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    for epoch in (1, 2):
        png = out / "images" / f"epoch_{epoch:04d}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_config(out / "config.yaml")
    assert saved == trainer.cfg
    assert json.loads((out / "summary.json").read_text())["steps"] == total


def test_teacher_encoder_loads_into_timm(reference) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    trainer, _, out = reference
    path = out / "teacher_encoder.safetensors"
    tensors = load_file(str(path))
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
            "blocks.1.mlp.fc2.bias", "norm.weight"} <= tensors.keys()
    assert not any(k.startswith(("head.", "recon_head.", "backbone.")) for k in tensors)
    vit = VisionTransformer(img_size=IMG, patch_size=16, in_chans=1, num_classes=0, global_pool="",
                            embed_dim=64, depth=2, num_heads=2, dynamic_img_size=True)
    vit.load_state_dict(tensors, strict=True)
    # it is the final teacher, and timm computes the same features as our encoder
    final = load_checkpoint(out / "checkpoints" / f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt")
    for k, v in tensors.items():
        assert torch.equal(v, final["teacher"][f"backbone.{k}"]), k
    vit.eval()
    x = torch.randn(2, 1, *IMG)
    with torch.no_grad():
        ours = trainer.teacher.backbone.forward_features(x)
        theirs = vit.forward_features(x)
    torch.testing.assert_close(theirs, ours)
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["img_size"]) == list(IMG) and meta["patch_size"] == "16"
    assert meta["step"] == str(2 * STEPS_PER_EPOCH)
    assert (meta["embed_dim"], meta["depth"], meta["num_heads"]) == ("64", "2", "2")


def test_output_layers_frozen_in_epoch_0_only(reference) -> None:
    trainer = reference[0]
    snaps = trainer.snapshots
    assert len(snaps["start"]) == 2  # last_layer.weight_v and last_layer_tokens.weight_v (g is fixed in v1)
    for before, after0 in zip(snaps["start"], snaps[0]):
        assert torch.equal(before, after0)
    # the rest of the student did train in epoch 0 ...
    assert not torch.equal(trainer.other_start, trainer.other_after_epoch0)
    # ... and the output layers train from epoch 1 on
    for after0, after1 in zip(snaps[0], snaps[1]):
        assert not torch.equal(after0, after1)


def test_teacher_is_an_ema_of_the_student(reference) -> None:
    _, _, out = reference
    state = load_checkpoint(out / "checkpoints" / f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt")
    student, teacher = state["student"], state["teacher"]
    assert set(teacher) == {k for k in student if not k.startswith("recon_head.")}
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(student[key], teacher[key])
    first = load_checkpoint(out / "checkpoints" / f"checkpoint_{STEPS_PER_EPOCH:09d}.pt")
    assert not torch.equal(first["teacher"][key], teacher[key])  # the teacher moves too


# --------------------------------------------------------------------------- single steps


@pytest.fixture
def trainer(tmp_path):
    """A set-up trainer without warm-up (the first step already changes the weights)."""
    t = Pretrainer(tiny_config(tmp_path / "run", "optim.warmup_epochs=0", "optim.freeze_last_layer_epochs=0"))
    t.setup()
    t.sampler.set_epoch(0)
    t.dataset.set_epoch(0)
    t.batches = iter(t.loader)
    yield t
    t.cleanup()


def test_ema_update_matches_the_formula(trainer) -> None:
    t0 = teacher_snapshot(trainer)
    s0 = student_snapshot(trainer)
    for k, v in t0.items():
        assert torch.equal(v, s0[k])  # the teacher starts as a copy
    momentum = float(trainer.momentum_sched[0])
    assert 0.99 <= momentum < 1.0
    result = trainer.train_step(next(trainer.batches), epoch=0)
    assert not result.skipped and trainer.step == 1
    s1 = student_snapshot(trainer)
    t1 = teacher_snapshot(trainer)
    changed = [k for k in t1 if not torch.equal(s1[k], s0[k])]
    assert len(changed) > len(t1) // 2
    for k in t1:
        expected = momentum * t0[k] + (1.0 - momentum) * s1[k]
        torch.testing.assert_close(t1[k], expected, rtol=1e-6, atol=1e-7, msg=k)
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(t1[key], s1[key]) and not torch.equal(t1[key], t0[key])


def test_param_groups_follow_dino_no_decay_on_biases_and_norms_only(trainer) -> None:
    """The authors' rule (DINO's get_params_groups): no decay for names ending in .bias and 1-D parameters;
    the [CLS] token and the positional embedding are decayed like the matrices."""
    names = {id(p): n for n, p in trainer.student.named_parameters()}
    decay, no_decay = trainer.optimizer.param_groups
    assert decay["apply_wd"] and not no_decay["apply_wd"] and no_decay["weight_decay"] == 0.0
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert not decay_names & no_decay_names
    assert {"backbone.norm.weight", "backbone.norm.bias", "backbone.blocks.0.norm1.weight",
            "backbone.blocks.0.attn.qkv.bias", "head.mlp.0.bias", "recon_head.convTrans.bias"} <= no_decay_names
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.patch_embed.proj.weight",
            "backbone.blocks.0.attn.qkv.weight", "head.mlp.0.weight", "head.last_layer.weight_v",
            "recon_head.convTrans.weight"} <= decay_names
    params = dict(trainer.student.named_parameters())
    assert all(n.endswith(".bias") or params[n].ndim == 1 for n in no_decay_names)
    assert all(not n.endswith(".bias") and params[n].ndim > 1 for n in decay_names)
    # the frozen g (v1) is in no group; every trainable parameter is in exactly one
    trainable = {n for n, p in trainer.student.named_parameters() if p.requires_grad}
    assert decay_names | no_decay_names == trainable
    assert "head.last_layer.weight_g" not in trainable
    # the schedule reaches the decayed group only
    trainer.step = 2
    hp = trainer._set_hyperparams()
    assert decay["weight_decay"] == pytest.approx(hp["wd"]) and no_decay["weight_decay"] == 0.0
    assert decay["lr"] == no_decay["lr"] == pytest.approx(hp["lr"])


# --------------------------------------------------------------------------- non-finite guard


def _inject_nan(monkeypatch, bad_calls: set[int] | None, mode: str = "mul") -> list[int]:
    """Make ASiTLoss return a NaN local term and total on the given calls (None: always).

    ``mode="mul"`` multiplies the total by NaN, so the gradients are NaN too (what a real overflow
    does); ``"add"`` adds NaN, which leaves the gradients finite (only the loss check can catch it).
    """
    original = ASiTLoss.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        terms, stats = original(self, *args, **kwargs)
        calls[0] += 1
        if bad_calls is None or calls[0] in bad_calls:
            nan = torch.tensor(float("nan"))
            total = terms["loss"] * nan if mode == "mul" else terms["loss"] + nan
            terms = dict(terms, local=terms["local"] + nan, loss=total)
        return terms, stats

    monkeypatch.setattr(ASiTLoss, "forward", forward)
    return calls


def _frozen_state(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    state = {f"s.{k}": v for k, v in student_snapshot(trainer).items()}
    state.update({f"t.{k}": v for k, v in teacher_snapshot(trainer).items()})
    state["c.global"] = trainer.loss_fn.center_global.clone()
    state["c.local"] = trainer.loss_fn.center_local.clone()
    return state


@pytest.mark.parametrize("mode, expected", [("mul", ["local", "grad_norm"]), ("add", ["local"])])
def test_nonfinite_loss_skips_the_step(trainer, monkeypatch, mode: str, expected: list[str]) -> None:
    _inject_nan(monkeypatch, bad_calls={2}, mode=mode)
    first = trainer.train_step(next(trainer.batches), epoch=0)
    assert not first.skipped
    before = _frozen_state(trainer)
    adam_steps = [s["step"].clone() for s in trainer.optimizer.state.values()]
    bad = trainer.train_step(next(trainer.batches), epoch=0)
    assert bad.skipped and bad.nonfinite == expected
    assert trainer.step == 2  # the batch is consumed, the schedules move on
    assert trainer.guard.nonfinite_total == 1 and trainer.guard.nonfinite_consecutive == 1
    assert_states_equal(_frozen_state(trainer), before)  # student, teacher and centres untouched
    assert [s["step"] for s in trainer.optimizer.state.values()] == adam_steps
    assert all(p.grad is None for p in trainer.student.parameters())
    event = read_log(trainer.run_dir)[-1]
    assert event["event"] == "nonfinite_skip" and event["nonfinite"] == expected
    assert event["local"] is None and event["nonfinite_total"] == 1 and event["step"] == 2
    good = trainer.train_step(next(trainer.batches), epoch=0)
    assert not good.skipped
    assert trainer.guard.nonfinite_consecutive == 0 and trainer.guard.nonfinite_total == 1
    after = _frozen_state(trainer)
    assert not torch.equal(after["s.backbone.cls_token"], before["s.backbone.cls_token"])
    assert not torch.equal(after["c.global"], before["c.global"])
    assert trainer.state_dict()["nonfinite"] == {"total": 1, "consecutive": 0}


def test_nonfinite_gradient_norm_alone_skips(trainer) -> None:
    before = _frozen_state(trainer)
    handle = trainer.student.backbone.cls_token.register_hook(lambda g: g * float("inf"))
    try:
        result = trainer.train_step(next(trainer.batches), epoch=0)
    finally:
        handle.remove()
    assert result.nonfinite == ["grad_norm"]
    assert math.isfinite(float(result.terms["loss"]))
    assert_states_equal(_frozen_state(trainer), before)
    assert trainer.guard.nonfinite_total == 1
    trainer.writer.flush()
    event = [r for r in read_log(trainer.run_dir) if r.get("event") == "nonfinite_skip"][-1]
    assert event["nonfinite_params"] == ["backbone"]  # only cls_token's gradient was poisoned


def test_fp16_scaler_overflow_skips_the_optimiser_only(trainer, caplog) -> None:
    """With loss scaling (fp16; a CPU GradScaler here), finite loss terms and overflowing scaled gradients are the
    scaler's routine overflow: it skips the optimiser step and halves its scale; the teacher EMA and the centres
    update as in the authors' (DINO) loop, and the step is not a non-finite skip. A run of overflows still stops
    at train.max_consecutive_nonfinite."""
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    assert not trainer.train_step(next(trainer.batches), epoch=0).skipped  # teacher and student now differ
    trainer.scaler.update(new_scale=2.0**127)  # loss x 2^127 overflows float32: every gradient is inf/NaN
    before = _frozen_state(trainer)
    with caplog.at_level("INFO", logger="asit.train.guard"):
        result = trainer.train_step(next(trainer.batches), epoch=0)
    assert result.scaler_overflow and result.nonfinite == ["grad_norm"]
    assert math.isfinite(float(result.terms["loss"]))
    after = _frozen_state(trainer)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k.startswith("s."))  # no optimiser step
    momentum = float(trainer.momentum_sched[1])
    for k in (k for k in before if k.startswith("t.")):  # the teacher EMA ran, towards the unchanged student
        expected = momentum * before[k] + (1 - momentum) * before["s." + k[2:]]
        torch.testing.assert_close(after[k], expected, rtol=1e-6, atol=1e-7, msg=k)
    assert not torch.equal(after["t.backbone.cls_token"], before["t.backbone.cls_token"])
    assert not torch.equal(after["c.global"], before["c.global"])  # the centres moved
    assert trainer.scaler.get_scale() == 2.0**126
    assert (trainer.guard.nonfinite_total, trainer.guard.scaler_overflows,
            trainer.guard.nonfinite_consecutive) == (0, 1, 1)
    assert "loss-scale overflow" in caplog.text and "WARNING" not in caplog.text
    state = trainer.state_dict()
    assert state["nonfinite"] == {"total": 0, "consecutive": 1} and state["scaler_overflows"] == 1
    trainer.guard.max_consecutive = 2
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive steps without an optimiser update.*loss scale"):
        trainer.train_step(next(trainer.batches), epoch=0)  # 2^126 overflows too


def test_consecutive_nonfinite_steps_stop_the_run(tmp_path, monkeypatch) -> None:
    calls = _inject_nan(monkeypatch, bad_calls=None)
    trainer = Pretrainer(tiny_config(tmp_path, "train.max_consecutive_nonfinite=4", "optim.warmup_epochs=0"))
    trainer.setup()
    start = _frozen_state(trainer)
    try:
        with pytest.raises(NonFiniteLossError, match=r"4 consecutive steps.*non-finite local, grad_norm"):
            trainer.train()
    finally:
        trainer.cleanup()
    assert calls[0] == 4 and trainer.step == 3  # the 4th bad step raised before its counter moved
    assert trainer.guard.nonfinite_total == 4
    assert_states_equal(_frozen_state(trainer), start)
    events = [r for r in read_log(tmp_path) if r.get("event") == "nonfinite_skip"]
    assert [e["nonfinite_consecutive"] for e in events] == [1, 2, 3, 4]
    assert not [r for r in read_log(tmp_path) if "event" not in r]  # nothing logged as a normal step


def test_pretrain_script_exits_nonzero_on_nonfinite_stop(tmp_path, monkeypatch) -> None:
    import importlib.util

    _inject_nan(monkeypatch, bad_calls=None)
    script = Path(__file__).parents[1] / "scripts" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("pretrain_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rc = module.main(["--config", "demo_cpu", *TINY, f"train.output_dir={tmp_path}",
                      "train.max_consecutive_nonfinite=2"])
    assert rc == 1


def test_batch_with_fewer_than_two_clips_is_skipped_but_counted(tmp_path) -> None:
    """A batch whose clips all failed to decode is skipped; the step counter, the schedules and the
    step-based checkpoints still advance (the old loop skipped the checkpoint of such a step)."""
    trainer = Pretrainer(tiny_config(tmp_path, "train.epochs=1", "train.checkpoint_every_steps=2",
                                     "train.image_every_epochs=0"))
    trainer.setup()
    real = trainer.loader

    class OneBadBatch:
        def __iter__(self):
            for i, batch in enumerate(real):
                if i == 1:  # the second batch keeps one clip only
                    batch = dict(batch, views=batch["views"][:1])
                yield batch

    trainer.loader = OneBadBatch()
    try:
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == STEPS_PER_EPOCH
    assert [r["step"] for r in read_log(tmp_path)] == [1, 3]
    assert (tmp_path / "checkpoints" / f"checkpoint_{2:09d}.pt").is_file()
    assert trainer.guard.nonfinite_total == 0


def test_fbank_on_the_device_trains_like_fbank_in_the_loader(reference, tmp_path) -> None:
    """data.fbank_on=device (the default on CUDA, forced here on the CPU): the loader sends waveform
    crops and the trainer computes the views; the run follows the loader-fbank run (the same crops;
    the fbank differs by float32 rounding only)."""
    _, ref_summary, ref_dir = reference
    trainer = Pretrainer(tiny_config(tmp_path, "data.fbank_on=device", "train.image_every_epochs=0"))
    trainer.setup()
    try:
        assert trainer.fbank_on == "device" and "waves" in next(iter(trainer.loader))
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["steps"] == ref_summary["steps"]
    ours, theirs = read_log(tmp_path), read_log(ref_dir)
    assert [r["step"] for r in ours] == [r["step"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-4), (a, b)
    for bad, match in ((["train.mode=reference", "train.precision=fp32"], "contradicts train.mode=authors"),
                       (["data.backend=dali"], "applies to data.backend=torch")):
        with pytest.raises(ConfigError, match=match):
            tiny_config(tmp_path, "data.fbank_on=device", *bad)


def test_batch_ring_trains_exactly_like_the_plain_loader(reference, tmp_path, monkeypatch) -> None:
    """data.batch_ring=enabled (the default on CUDA) with two loader workers: the batches come through the
    shared-memory ring and the run logs the same losses as the run without workers."""
    from asit.train.cpu_threads import choose_cpu_threads

    _, _, ref_dir = reference
    # the CPU thread rule gives a run with loader workers fewer torch threads, which changes the last bits of
    # its sums; the reference run's thread count is pinned here, so only the transport differs
    threads, _ = choose_cpu_threads(0)  # None: OMP_NUM_THREADS is set and both runs follow it
    before = torch.get_num_threads()
    if threads is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
    trainer = Pretrainer(tiny_config(tmp_path, "data.num_workers=2", "data.batch_ring=enabled",
                                     "train.image_every_epochs=0"))
    trainer.setup()
    try:
        assert trainer.ring.slots_per_worker == 5  # prefetch_factor 4, plus one
        from asit.data.ring import RingRef

        assert isinstance(next(iter(trainer.loader))["views"], RingRef)
        trainer.train()
    finally:
        trainer.cleanup()
        torch.set_num_threads(before)
    ours, theirs = read_log(tmp_path), read_log(ref_dir)
    assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in theirs]
    with pytest.raises(ConfigError, match="batch_ring=enabled needs"):
        tiny_config(tmp_path, "data.batch_ring=enabled")  # no loader workers


def test_batch_ring_auto_falls_back_when_shared_memory_is_short(tmp_path, monkeypatch, caplog) -> None:
    """auto (on CUDA) takes the DataLoader's own transport, with a warning, when /dev/shm cannot hold the
    rings of every process on the node or the allocation fails; enabled refuses with the size."""
    import types

    import asit.data.ring as ring_module
    import asit.train.loaders as loaders_module
    from asit.train.loaders import make_batch_ring

    trainer = Pretrainer(tiny_config(tmp_path, "data.num_workers=2", "train.image_every_epochs=0"))
    trainer.setup()
    try:
        assert trainer.ring is None  # auto on the CPU: off
        trainer.device = types.SimpleNamespace(type="cuda")  # what auto looks at
        need = ring_module.ring_bytes({"views": (8, 2, 1, *IMG)}, 2, 4)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        monkeypatch.setattr(loaders_module, "shared_memory_free", lambda: 3 * need)  # 1 ring fits, 4 do not
        with caplog.at_level("WARNING", logger="asit.train.engine"):
            assert make_batch_ring(trainer.cfg, trainer.dataset, trainer.device, 2, 4, from_manifest=True) is None
        assert "4 process(es) on this node" in caplog.text
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")

        def full(*args, **kwargs):
            raise RuntimeError("unable to allocate shared memory")

        monkeypatch.setattr(loaders_module, "BatchRing", full)
        with caplog.at_level("WARNING", logger="asit.train.engine"):
            assert make_batch_ring(trainer.cfg, trainer.dataset, trainer.device, 2, 4, from_manifest=True) is None
        assert "unable to allocate" in caplog.text
        monkeypatch.undo()
        monkeypatch.setattr(ring_module, "shared_memory_free", lambda path="/dev/shm": need // 2)
        trainer.cfg.data.batch_ring = "enabled"
        with pytest.raises(MemoryError, match="/dev/shm"):
            make_batch_ring(trainer.cfg, trainer.dataset, trainer.device, 2, 4, from_manifest=True)
    finally:
        trainer.cleanup()


def test_v2_recipe_shape_trains(tmp_path) -> None:
    """v2 settings: clean local views in the [CLS] loss, one shared head with a trainable g."""
    cfg = tiny_config(tmp_path, "data.local_views=2", "data.local_crop_seconds=0.5",
                      "data.local_target_frames=32",
                      "model.head_out_tokens=null", "model.trainable_g=true", "model.recon_out=64",
                      "loss.global_pairs=v2", "loss.weight_global=0.5", "loss.weight_local=0.5",
                      "loss.weight_recon=1.0", "train.max_steps_per_epoch=2", "train.image_every_epochs=0")
    trainer = RecordingPretrainer(cfg)
    run(trainer)
    records = read_log(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(math.isfinite(r[k]) for k in ("loss", "global", "local", "recon",
                                                   "teacher_entropy_tokens"))
        assert r["loss"] == pytest.approx(0.5 * r["global"] + 0.5 * r["local"] + r["recon"], rel=1e-5)
    assert trainer.student.head.last_layer_tokens is None
    assert len(trainer.snapshots["start"]) == 2  # weight_g and weight_v of the shared layer
    assert torch.equal(trainer.snapshots["start"][0], trainer.snapshots[0][0])
    assert not torch.equal(trainer.snapshots[0][0], trainer.snapshots[1][0])  # g trains after epoch 0


# --------------------------------------------------------------------------- resume


def test_resume_extends_a_finished_run(tmp_path) -> None:
    """1 epoch, then ``--resume`` with epochs=2: the step counter and the centres continue."""
    run(Pretrainer(tiny_config(tmp_path, "train.epochs=1", "train.image_every_epochs=0")))
    saved = load_checkpoint(tmp_path / "checkpoints" / f"checkpoint_{STEPS_PER_EPOCH:09d}.pt")
    assert saved["step"] == STEPS_PER_EPOCH
    resumed = RecordingPretrainer(tiny_config(tmp_path, "train.image_every_epochs=0"), resume=True)
    try:
        resumed.setup()
        assert resumed.step == STEPS_PER_EPOCH and resumed.start_epoch == 1 and resumed.skip_batches == 0
        c_global, c_local = resumed.centers_at_start
        assert torch.equal(c_global, saved["loss"]["center_global"]) and c_global.abs().sum() > 0
        assert torch.equal(c_local, saved["loss"]["center_local"])
        assert_states_equal(student_snapshot(resumed), saved["student"])
        summary = resumed.train()
    finally:
        resumed.cleanup()
    assert summary["steps"] == 2 * STEPS_PER_EPOCH
    assert [r["step"] for r in read_log(tmp_path)] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    final = load_checkpoint(tmp_path / "checkpoints" / f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt")
    assert not torch.equal(final["loss"]["center_global"], saved["loss"]["center_global"])


@pytest.mark.parametrize("crash_at, extra", [
    (STEPS_PER_EPOCH, []),  # at the end of epoch 0
    (STEPS_PER_EPOCH + 1, ["train.checkpoint_every_steps=2"]),  # mid-epoch 1 (one batch consumed)
])
def test_resume_after_interruption_is_exact(reference, tmp_path, crash_at: int, extra: list[str]) -> None:
    cfg = tiny_config(tmp_path, "train.image_every_epochs=0", *extra)
    crashing = CrashingPretrainer(cfg)
    crashing.crash_at = crash_at
    with pytest.raises(Interrupted):
        run(crashing)
    resumed = Pretrainer(cfg, resume=True)
    resumed.setup()
    try:
        assert resumed.step == crash_at
        assert resumed.skip_batches == crash_at % STEPS_PER_EPOCH
        resumed.train()
    finally:
        resumed.cleanup()
    _, _, ref_dir = reference
    name = f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt"
    ref = load_checkpoint(ref_dir / "checkpoints" / name)
    got = load_checkpoint(tmp_path / "checkpoints" / name)
    assert_states_equal(got["student"], ref["student"])
    assert_states_equal(got["teacher"], ref["teacher"])
    assert_states_equal(got["loss"], ref["loss"])
    ref_opt, got_opt = ref["optimizer"]["state"], got["optimizer"]["state"]
    assert ref_opt.keys() == got_opt.keys()
    for k in ref_opt:
        assert_states_equal(got_opt[k], ref_opt[k])
    # the log holds every step once, the interrupted run's part and the resumed part
    steps = [r["step"] for r in read_log(tmp_path)]
    assert steps == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    ref_loss = [r["loss"] for r in read_log(ref_dir)]
    assert [r["loss"] for r in read_log(tmp_path)] == ref_loss


def test_resume_warns_about_changed_settings(tmp_path, caplog) -> None:
    """Settings that change the data order, schedules or objective are listed in a warning on resume; output,
    logging and checkpoint cadence may change silently; an unchanged config resumes without the warning."""
    run(Pretrainer(tiny_config(tmp_path, "train.epochs=1", "train.image_every_epochs=0")))

    def resume_warnings(*extra: str) -> list[str]:
        caplog.clear()
        trainer = Pretrainer(tiny_config(tmp_path, "train.epochs=1", "train.image_every_epochs=0", *extra),
                             resume=True)
        try:
            with caplog.at_level("WARNING", logger="asit.train.engine"):
                trainer.setup()
        finally:
            trainer.cleanup()
        return [r.getMessage() for r in caplog.records if "setting(s) changed" in r.getMessage()]

    assert resume_warnings("train.log_every=2", "train.checkpoint_every_steps=5", "train.keep_last=4") == []
    (message,) = resume_warnings("train.sync_free=true")  # other GMML masks from the same generator
    assert "train.sync_free: None there, True here" in message
    (message,) = resume_warnings("train.seed=1", "optim.lr=2e-3", "loss.weight_recon=1.0", "train.epochs=3",
                                 "train.log_every=2")
    assert "with 4 setting(s) changed" in message
    for item in ("train.seed: 0 there, 1 here", "optim.lr: 0.001 there, 0.002 here",
                 "loss.weight_recon: 2.0 there, 1.0 here", "train.epochs: 1 there, 3 here"):
        assert item in message
    assert "log_every" not in message


def test_resume_rejects_a_different_dataset_size(tmp_path) -> None:
    from asit.train.checkpoint import CheckpointError

    run(Pretrainer(tiny_config(tmp_path, "train.epochs=1", "train.image_every_epochs=0")))
    other = Pretrainer(tiny_config(tmp_path, "train.max_steps_per_epoch=2"), resume=True)
    try:
        with pytest.raises(CheckpointError, match="steps/epoch"):
            other.setup()
    finally:
        other.cleanup()


# --------------------------------------------------------------------------- learning


def test_reconstruction_loss_falls(tmp_path) -> None:
    """30 steps, fixed teacher temperature, a high learning rate (0.05 x 8/256 = 1.6e-3).

    The distillation terms rise at first (the centre flattens the teacher, pulling its entropy and
    the cross-entropy up towards log K) so the total is not a good signal this early; the
    reconstruction term falls steadily (about 0.55-0.6 -> 0.3 over seeds 0-2).
    """
    cfg = tiny_config(tmp_path, "train.epochs=5", "train.max_steps_per_epoch=6", "optim.lr=0.05",
                      "loss.warmup_teacher_temp=0.04", "loss.teacher_temp=0.04", "train.image_every_epochs=0",
                      "train.keep_last=1")
    summary = run(Pretrainer(cfg))
    records = read_log(tmp_path)
    assert summary["steps"] == 30 and len(records) == 30
    recon = [r["recon"] for r in records]
    first, last = sum(recon[:5]) / 5, sum(recon[-5:]) / 5
    total = [r["loss"] for r in records]
    print(f"recon first5={first:.3f} last5={last:.3f}; "
          f"total first5={sum(total[:5]) / 5:.3f} last5={sum(total[-5:]) / 5:.3f}")
    assert last < 0.75 * first
    assert all(math.isfinite(r["loss"]) for r in records)
