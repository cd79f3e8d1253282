"""The graph-ready step (``train.cuda_graph``, :mod:`asit.train.step_graph`).

On the CPU the step runs eagerly (``StepGraph(capture=False)``): it must equal the eager sync-free step bit for
bit (weights, teacher, centres, optimiser state, loss terms, GMML masks) and read nothing back to the host. The
capture itself runs only on CUDA (skipped here): captured replays against the same step run eagerly.
"""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from host_reads import HostReads
from test_train_engine import (  # noqa: F401  (_env: module fixture, temp ASIT_CACHE and 1 thread)
    STEPS_PER_EPOCH,
    _env,
    _frozen_state,
    assert_states_equal,
    read_log,
    run,
    tiny_config,
)

import asit.data.fbank as fbank
import asit.train.engine as engine
import asit.train.losses as losses
from asit.config import ConfigError
from asit.train import Pretrainer
from asit.train.checkpoint import load_checkpoint
from asit.train.step_graph import StepGraph

SYNC_FREE = ("train.sync_free=true", "optim.warmup_epochs=0")
# the bf16 levers: the residual stream in bf16, the teacher's forward on a bf16 copy (refreshed by the EMA), fused EMA
_LEVERS = ("train.precision=bf16", "model.residual_dtype=bf16", "train.teacher_bf16=true", "train.ema=fused")


def _trainer(tmp_path, *extra: str, graph: bool = False) -> Pretrainer:
    """A sync-free tiny trainer, on the CPU unless ``extra`` says ``train.device=cuda`` (bitwise comparisons need
    the CPU's kernels, even on a GPU machine)."""
    trainer = Pretrainer(tiny_config(tmp_path, *SYNC_FREE, "train.device=cpu", *extra))
    trainer.setup()
    if graph:  # the graph-ready step, run eagerly (what a CUDA run captures)
        trainer.step_graph = StepGraph(trainer, capture=False)
    return trainer


def _batches(trainer: Pretrainer, n: int) -> list[dict]:
    out: list[dict] = []
    while len(out) < n:
        out += list(trainer.loader)
    return out[:n]


def _optimizer_state(trainer: Pretrainer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v for i, (_, s) in enumerate(trainer.optimizer.state.items()) for k, v in s.items()}


def _assert_teacher_copy_fresh(trainer: Pretrainer) -> None:
    """With ``train.teacher_bf16`` the teacher's forward reads a bf16 copy: it must hold the EMA'd teacher."""
    copy = trainer.pair.teacher_copy
    if copy is not None:
        for a, b in zip(copy.parameters(), trainer.pair.teacher.parameters(), strict=True):
            assert torch.equal(a, b.to(a.dtype))


def _run_steps(trainer: Pretrainer, epochs: list[int]) -> list[dict[str, torch.Tensor]]:
    """Train one step per entry of ``epochs`` (the epoch decides the frozen last layer); per step the loss
    terms, the flags and the GMML mask. The global RNG (drop path) is reseeded first: the trainers share it."""
    torch.manual_seed(1)
    record = []
    for batch, epoch in zip(_batches(trainer, len(epochs)), epochs, strict=True):
        captured = {}
        corrupt = trainer._corrupt

        def spy(views, corrupt=corrupt, captured=captured):
            out = corrupt(views)
            captured["mask"] = out[2].clone()
            return out

        trainer._corrupt = spy
        result = trainer.train_step(batch, epoch=epoch, monitors=True)
        del trainer._corrupt
        record.append({**{k: v.clone() for k, v in result.terms.items()}, "flags": result.flags.clone(),
                       **{f"monitor.{k}": v.clone() for k, v in result.monitors.items()}, **captured})
    return record


@pytest.mark.parametrize("extra", [(), ("train.ema=fused", "optim.clip_mode=global"),
                                   ("data.local_views=2", "loss.global_pairs=v2", "train.precision=bf16"),
                                   ("data.fbank_on=device", "data.local_views=2", "loss.global_pairs=v2"),
                                   ("loss.fused_head=true",),
                                   ("loss.fused_head=true", *_LEVERS, "data.local_views=2", "loss.global_pairs=v2")])
def test_graph_ready_step_equals_the_sync_free_step_bitwise(tmp_path, extra) -> None:
    """Three steps (last layer frozen, then trained) of the eager sync-free step and of the graph-ready step,
    on the same batches: the same weights, teacher, centres, AdamW state, loss terms, monitors and masks."""
    epochs = [0, 1, 1]
    ref, new = _trainer(tmp_path / "ref", *extra), _trainer(tmp_path / "graph", *extra, graph=True)
    try:
        start = _frozen_state(new)
        want, got = _run_steps(ref, epochs), _run_steps(new, epochs)
        for a, b in zip(want, got, strict=True):
            assert_states_equal(b, a)
        assert_states_equal(_frozen_state(new), _frozen_state(ref))
        assert_states_equal(_optimizer_state(new), _optimizer_state(ref))
        assert new.step == ref.step == 3 and new._hp == ref._hp
        after = _frozen_state(new)
        for key in ("s.backbone.cls_token", "t.backbone.cls_token", "c.global", "c.local"):
            assert not torch.equal(after[key], start[key]), key  # the steps did train
        _assert_teacher_copy_fresh(new)
        assert (new.pair.teacher_copy is not None) == ("train.teacher_bf16=true" in extra)
        new.guard.sync(new.step)
        ref.guard.sync(ref.step)
        assert new.guard.state_dict() == ref.guard.state_dict()
        assert new.optimizer.param_groups[0]["lr"] is new.step_graph.lr  # the step read a tensor
    finally:
        ref.cleanup()
        new.cleanup()


def test_graph_ready_step_follows_the_host_step_counter(tmp_path) -> None:
    """A step the host skips (an unusable batch) moves the schedules on for the next graph-ready step."""
    ref, new = _trainer(tmp_path / "ref"), _trainer(tmp_path / "graph", graph=True)
    try:
        batches = _batches(ref, 2)
        for t in (ref, new):
            torch.manual_seed(1)
            t.train_step(batches[0], epoch=1)
            t.step += 1  # what train() does for an unusable batch
            t.train_step(batches[1], epoch=1)
        assert int(new.step_graph.step_t) == new.step == 3
        assert_states_equal(_frozen_state(new), _frozen_state(ref))
    finally:
        ref.cleanup()
        new.cleanup()


def test_graph_ready_step_skips_a_nonfinite_step_on_the_device(tmp_path, monkeypatch) -> None:
    """A NaN loss term: no update (weights, teacher, centres, AdamW state, decay), counted at the next sync."""
    new = _trainer(tmp_path, graph=True)
    try:
        batches = _batches(new, 2)
        new.train_step(batches[0], epoch=1)
        before = _frozen_state(new)
        adam = {k: v.clone() for k, v in _optimizer_state(new).items()}
        forward = losses.ASiTLoss.forward

        def nan_local(self, *args, **kwargs):
            terms, stats = forward(self, *args, **kwargs)
            terms["loss"] = terms["loss"] * float("nan")
            terms["local"] = terms["local"] * float("nan")
            return terms, stats

        monkeypatch.setattr(losses.ASiTLoss, "forward", nan_local)
        result = new.train_step(batches[1], epoch=1)
        assert result.skipped and "local" in result.nonfinite
        assert_states_equal(_frozen_state(new), before)
        assert_states_equal(_optimizer_state(new), adam)
        new.guard.sync(new.step)
        assert new.guard.nonfinite_total == 1
    finally:
        new.cleanup()


@pytest.mark.parametrize("fbank_on, extra", [("loader", ()), ("device", ()), ("loader", ("loss.fused_head=true",)),
                                             ("device", ("loss.fused_head=true", *_LEVERS))])
def test_graph_ready_step_reads_nothing_back(tmp_path, monkeypatch, fbank_on, extra) -> None:
    """Nothing in a warm graph-ready step asks the host for a value (the fused ops' CPU references excepted,
    as in tests/test_train_sync_free.py: on CUDA they are Triton kernels), the fbank on the device and the
    fused head (``loss.fused_head``) and the bf16 levers included."""
    for module, name in ((engine, "gmml_corrupt"), (losses, "centered_softmax_cross_entropy"),
                         (losses, "masked_l1_loss")):
        monkeypatch.setattr(module, name, HostReads.allow(getattr(module, name)))
    monkeypatch.setattr(fbank, "_NUMPY_ON_CPU", False)  # the pure-torch fbank that CUDA runs
    fused_calls = []
    fused = losses.linear_centered_softmax_cross_entropy

    def counted(*args, **kwargs):  # inspected, not allowed: the fused head's own code reads nothing either
        fused_calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(losses, "linear_centered_softmax_cross_entropy", counted)
    new = _trainer(tmp_path, f"data.fbank_on={fbank_on}", *extra, graph=True)
    try:
        batches = _batches(new, 2)
        assert ("waves" in batches[1]) == (fbank_on == "device")
        fused_head = "loss.fused_head=true" in extra
        assert new.loss_fn.fused_head is fused_head
        new.train_step(batches[0], epoch=1)  # first step: optimiser state is created
        before = new.student.backbone.cls_token.detach().clone()
        with HostReads() as reads:
            result = new.train_step(batches[1], epoch=1)
        assert reads.reads == []
        assert not result.skipped
        assert len(fused_calls) == 2 * fused_head
        assert not torch.equal(new.student.backbone.cls_token, before)
    finally:
        new.cleanup()


@pytest.mark.parametrize("extra, match", [
    (("train.mode=authors",), "train.cuda_graph=true needs train.mode=fast"),
    (("train.device=cpu",), "train.cuda_graph=true needs a CUDA device"),
    (("train.sync_free=false",), r"train.cuda_graph=true needs the sync-free step: train.sync_free"),
    (("train.precision=fp16",), "train.precision bf16 or fp32"),
    (("train.compile_mode=reduce-overhead",), "train.compile_mode=reduce-overhead"),
    (("train.compile_mode=max-autotune",), "max-autotune-no-cudagraphs"),
])
def test_cuda_graph_config_errors(tmp_path, extra, match) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path, "train.cuda_graph=true", *extra)


def test_cuda_graph_refuses_what_it_cannot_capture(tmp_path) -> None:
    """Checked again on the built trainer: the resolved device, the sync-free step and one process."""
    if not torch.cuda.is_available():
        cpu = Pretrainer(tiny_config(tmp_path / "a", *SYNC_FREE, "train.cuda_graph=true"))  # device auto: the CPU
        try:
            with pytest.raises(ValueError, match="train.cuda_graph=true needs a CUDA device"):
                cpu.setup()
        finally:
            cpu.cleanup()
    trainer = _trainer(tmp_path / "b", "train.sync_free=false")
    try:
        with pytest.raises(ValueError, match=r"train.cuda_graph=true needs the sync-free step"):
            StepGraph(trainer, capture=False)
        trainer.sync_free = True
        trainer.dist = dataclasses.replace(trainer.dist, world_size=2)
        with pytest.raises(ValueError, match="DDP's gradient all-reduce.*2 processes.*train.cuda_graph=false"):
            StepGraph(trainer, capture=False)
        trainer.dist = dataclasses.replace(trainer.dist, world_size=1)
    finally:
        trainer.cleanup()


class _FakeGraph:
    """A CPU stand-in for a captured graph. :meth:`_SimulatedCapture._record` runs the step once, as a capture
    runs the Python (``p.grad`` then holds the tensors it allocated) and the first replay the kernels; each later
    replay runs the step again, writing the gradients into the tensors the capture left in ``p.grad`` (a graph's
    backward writes the same memory, its optimiser reads it) and the results into the first step's tensors, and
    leaves the ``p.grad`` that Python sees as it found it (a replay runs no Python)."""

    def __init__(self, owner: StepGraph, frozen: bool) -> None:
        self.owner, self.frozen = owner, frozen
        self.params = [p for group in owner.trainer.optimizer.param_groups for p in group["params"]]
        self.grads = [p.grad for p in self.params]  # the "graph pool" gradients
        self.first = True

    def replay(self) -> None:
        if self.first:  # the capture ran the step already
            self.first = False
            return
        optimizer = self.owner.trainer.optimizer
        visible = [p.grad for p in self.params]
        for p, g in zip(self.params, self.grads, strict=True):
            p.grad = g
        zero_grad = optimizer.zero_grad
        optimizer.zero_grad = lambda set_to_none=True: zero_grad(set_to_none=False)  # no new gradient tensors
        try:
            new = self.owner._body(self.owner.static, self.frozen)
        finally:
            del optimizer.zero_grad
            for p, g in zip(self.params, visible, strict=True):
                p.grad = g
        _copy_into(self.owner.out, new)


def _copy_into(dst, src) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_into(dst[k], src[k])
    elif isinstance(dst, tuple):
        for d, s_ in zip(dst, src, strict=True):
            _copy_into(d, s_)


class _SimulatedCapture(StepGraph):
    """The capture bookkeeping (warm-up, static buffers, a new graph when the frozen last layer ends, eager
    steps for a batch of another shape, results that outlive the next replay) on the CPU."""

    def _record(self, frozen: bool):
        out = self._body(self.static, frozen)
        return _FakeGraph(self, frozen), out


def _grads(trainer: Pretrainer) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for g in trainer.optimizer.param_groups for p in g["params"]]


@pytest.mark.parametrize("fbank_on", ["loader", "device"])
def test_capture_bookkeeping_keeps_the_step_exact(tmp_path, fbank_on) -> None:
    """Ten steps through the capture logic (warm-up 2; the last layer frozen for five; steps 4 and 9 one clip
    short, so eager beside a captured graph) equal the eager sync-free step bit for bit, gradients included; the
    results stay valid after later replays; ``p.grad`` stays the graph's gradients (its optimiser's) throughout,
    also after an eager step, so a replay after it leaves this step's gradients there, not that step's."""
    epochs = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    extra = (f"data.fbank_on={fbank_on}",)
    ref, new = _trainer(tmp_path / "ref", *extra), _trainer(tmp_path / "graph", *extra)
    try:
        sg = new.step_graph = _SimulatedCapture(new, capture=False, warmup_steps=2)
        sg.capture = True  # the capture path, with _record faked
        batches = _batches(ref, len(epochs))
        key = "waves" if fbank_on == "device" else "views"  # the graph's input buffer
        for i in (3, 8):
            batches[i] = {**batches[i], key: batches[i][key][:-1]}  # an unusable clip dropped
        results: dict[str, list] = {"ref": [], "graph": []}
        grads: dict[str, list] = {"ref": [], "graph": []}
        for name, t in (("ref", ref), ("graph", new)):
            torch.manual_seed(1)
            for i, (b, e) in enumerate(zip(batches, epochs, strict=True)):
                results[name].append(t.train_step(b, epoch=e))
                grads[name].append(_grads(t))
                if t is new and i in (2, 3, 4, 7, 8, 9):  # a graph is captured: p.grad is its gradients
                    params, last = sg.graph.params, {id(p) for p in new.last_layer_params}
                    assert all(p.grad is g for p, g in zip(params, sg.graph.grads, strict=True)), i
                    assert [p.grad is None for p in params] == [id(p) in last and e == 0 for p in params], i
        for a, b in zip(results["ref"], results["graph"], strict=True):
            assert_states_equal(b.terms, a.terms)
            assert torch.equal(b.flags, a.flags)
        for i, (a, b) in enumerate(zip(grads["ref"], grads["graph"], strict=True)):
            assert [g is None for g in a] == [g is None for g in b], i
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True) if x is not None), i
        assert_states_equal(_frozen_state(new), _frozen_state(ref))
        assert_states_equal(_optimizer_state(new), _optimizer_state(ref))
        # steps 1-2 warm-up, 3 captured, 4 eager (shape), 5 replayed, 6-7 warm-up again (last layer trained),
        # 8 captured, 9 eager (shape), 10 replayed
        assert (sg.captures, sg.replays) == (2, 4)
        assert list(sg.static) == [key] and sg.static[key].shape == batches[0][key].shape
    finally:
        ref.cleanup()
        new.cleanup()


class _GraphReadyPretrainer(Pretrainer):
    """Trains with the graph-ready step run eagerly (what ``train.cuda_graph`` captures on CUDA)."""

    def setup(self) -> None:
        super().setup()
        self.step_graph = StepGraph(self, capture=False)


def test_graph_ready_training_run_equals_the_sync_free_run_and_resumes(tmp_path) -> None:
    """Two epochs through ``train()`` (logging, monitors, checkpoints, the epoch picture, the frozen last layer
    ending): the same log and checkpoint as the sync-free run; and a run resumed from its mid-run checkpoint
    (written with a tensor learning rate) ends the same with or without the graph-ready step."""
    common = (*SYNC_FREE, "train.device=cpu", "train.checkpoint_every_steps=2", "train.keep_every_steps=2")
    cfg = {name: tiny_config(tmp_path / name, *common) for name in ("plain", "graph", "resumed")}
    for name, cls in (("plain", Pretrainer), ("graph", _GraphReadyPretrainer)):
        torch.manual_seed(1)
        run(cls(cfg[name]))
    logged = [[{k: v for k, v in r.items() if k not in ("samples_per_s", "time")} for r in read_log(tmp_path / d)]
              for d in ("plain", "graph")]
    assert logged[0] == logged[1] and len(logged[0]) >= 2 * STEPS_PER_EPOCH
    last = f"checkpoint_{2 * STEPS_PER_EPOCH:09d}.pt"
    ref, got = (load_checkpoint(tmp_path / d / "checkpoints" / last) for d in ("plain", "graph"))
    for key in ("student", "teacher", "loss"):
        assert_states_equal(got[key], ref[key])
    for k in ref["optimizer"]["state"]:
        assert_states_equal(got["optimizer"]["state"][k], ref["optimizer"]["state"][k])
    assert torch.is_tensor(got["optimizer"]["param_groups"][0]["lr"])
    assert torch.equal(got["rng"]["gmml"], ref["rng"]["gmml"])
    # resume the graph-ready run's step-2 checkpoint with the plain step: the plain run's end
    shutil.copytree(tmp_path / "graph", tmp_path / "resumed", dirs_exist_ok=True)
    for f in (tmp_path / "resumed" / "checkpoints").glob("checkpoint_*"):
        if not f.name.startswith("checkpoint_000000002"):
            f.unlink()
    (tmp_path / "resumed" / "config.yaml").write_text((tmp_path / "graph" / "config.yaml").read_text())
    resumed = Pretrainer(cfg["resumed"], resume=True)
    resumed.setup()
    try:
        assert resumed.step == 2
        resumed.train()
    finally:
        resumed.cleanup()
    end = load_checkpoint(tmp_path / "resumed" / "checkpoints" / last)
    for key in ("student", "teacher", "loss"):
        assert_states_equal(end[key], ref[key])


def test_cuda_graph_is_off_by_default(tmp_path) -> None:
    trainer = _trainer(tmp_path)
    try:
        assert trainer.cfg.train.cuda_graph is False and trainer.step_graph is None
    finally:
        trainer.cleanup()


# ------------------------------------------------------------------ CUDA: the capture itself


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: graph capture")
@pytest.mark.parametrize("compile_, fbank_on, extra", [
    (False, "device", ()), (False, "loader", ()), (True, "device", ()),
    (False, "loader", ("loss.fused_head=true",)), (True, "device", ("loss.fused_head=true", *_LEVERS)),
])
def test_captured_steps_equal_the_eager_graph_ready_steps(tmp_path, compile_, fbank_on, extra) -> None:
    """Five steps: two eager warm-up steps, then three replays of the graph captured at step 3 (the last under
    ``set_sync_debug_mode("error")``), against five eager graph-ready steps on the same batches: the same GMML
    masks and, up to non-deterministic reductions, the same weights, teacher and centres; and close to the
    eager sync-free step (which differs by the rounding of the learning rate and the decay formula). Also with
    the fused head (its chunked Triton loss inside the graph) and the bf16 levers (the teacher's bf16 copy is
    refreshed inside the graph: the teacher forward reads it)."""
    common = ("train.device=cuda", "train.max_steps_per_epoch=6", "optim.freeze_last_layer_epochs=0",
              f"train.compile={str(compile_).lower()}", f"data.fbank_on={fbank_on}", *extra)
    graphed = _trainer(tmp_path / "graph", *common, "train.cuda_graph=true")
    eager = _trainer(tmp_path / "eager", *common, graph=True)
    plain = _trainer(tmp_path / "plain", *common)
    try:
        assert graphed.step_graph.capture and not eager.step_graph.capture
        steps = 5
        masks = {}
        for name, t in (("graph", graphed), ("eager", eager), ("plain", plain)):
            torch.manual_seed(1)  # drop path draws from the default generator, which the trainers share
            masks[name] = []
            for i, batch in enumerate(_batches(t, steps)):
                if name == "graph" and i == steps - 1:
                    batch = {k: v.to("cuda", non_blocking=True) if isinstance(v, torch.Tensor) else v
                             for k, v in batch.items()}
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    result = t.train_step(batch, epoch=0)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                if name != "plain":
                    masks[name].append(t.step_graph.last["mask"].clone())
            assert not result.skipped
        assert (graphed.step_graph.captures, graphed.step_graph.replays) == (1, 3)
        for a, b in zip(masks["graph"], masks["eager"], strict=True):
            assert torch.equal(a, b)
        got, want, near = _frozen_state(graphed), _frozen_state(eager), _frozen_state(plain)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4, msg=k)
            torch.testing.assert_close(got[k], near[k], rtol=1e-2, atol=2e-4, msg=k)
        _assert_teacher_copy_fresh(graphed)  # refreshed by the replays, not only by the eager steps
        assert torch.equal(graphed.gmml_gen.get_state(), eager.gmml_gen.get_state())
        assert torch.equal(graphed.gmml_gen.get_state(), plain.gmml_gen.get_state())
    finally:
        for t in (graphed, eager, plain):
            t.cleanup()
