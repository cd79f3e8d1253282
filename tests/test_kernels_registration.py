"""torch.library registration, torch.compile, backend selection, validation and the centre update."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import asit.ops as ops
from asit.ops import _triton  # registers the asit:: ops


def _blocks(b, h, w, device):
    return ops.sample_gmml_blocks(b, h, w, device=device, max_block_frac=0.6)


# ---------------------------------------------------------------- opcheck

# The forward ops return the unscaled gradient as their last output, and their backward scales that
# buffer in place. opcheck's test_aot_dispatch_dynamic returns every output to the caller, so under
# it the backward would mutate a tensor the caller holds, which AOTAutograd's partitioner rejects;
# the public ops drop that output. So the forward ops get every other opcheck test with gradients,
# the full set without, and _aot_matches_eager checks the AOT path as the ops are called.
_NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def _aot_matches_eager(op, args, keep: int):
    """The first ``keep`` outputs of ``op`` and the gradient of their sum, eager against AOTAutograd."""
    def fn(*a):
        return op(*a)[:keep]

    results = []
    for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaf = args[0].detach().clone().requires_grad_()
        outs = run(leaf, *args[1:])
        (sum(o.float().sum() * (i + 2) for i, o in enumerate(outs))).backward()  # upstream grads != 1
        results.append((*outs, leaf.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


def test_opcheck_masked_l1(device):
    pred = torch.randn(2, 1, 6, 5, device=device, requires_grad=True)
    target = torch.randn(2, 1, 6, 5, device=device)
    mask = torch.rand(2, 1, 6, 5, device=device) < 0.5
    op = torch.ops.asit.masked_l1.default
    torch.library.opcheck(op, (pred, target, mask, True), test_utils=_NO_AOT)
    torch.library.opcheck(op, (pred.detach(), target, mask, False))
    # mixed dtypes: a bf16 prediction against an fp32 target
    bf16 = pred.detach().bfloat16().requires_grad_()
    torch.library.opcheck(op, (bf16, target, mask, True), test_utils=_NO_AOT)
    _aot_matches_eager(op, (pred, target, mask, True), keep=1)
    _aot_matches_eager(op, (bf16, target, mask, True), keep=1)
    _, den, grad = op(pred.detach(), target, mask, True)
    # the backward scales the stored gradient in place (mutates_args=("grad",))
    torch.library.opcheck(torch.ops.asit.masked_l1_backward.default, (grad, torch.tensor(2.0), den))


def test_opcheck_distill_ce(device):
    student = torch.randn(3, 20, device=device, requires_grad=True)
    teacher = torch.randn(3, 20, device=device)
    center = torch.randn(20, device=device)
    temps = (torch.tensor(0.1, device=device), torch.tensor(0.04, device=device))
    op = torch.ops.asit.distill_ce.default
    torch.library.opcheck(op, (student, teacher, center, *temps, True), test_utils=_NO_AOT)
    torch.library.opcheck(op, (student.detach(), teacher, center, *temps, False))
    _aot_matches_eager(op, (student, teacher, center, *temps, True), keep=2)
    # the backward scales the stored gradient in place (mutates_args=("grad",))
    torch.library.opcheck(torch.ops.asit.distill_ce_backward.default,
                          (torch.randn(3, 20, device=device), torch.rand(3, device=device)))


@pytest.mark.parametrize("op", ["masked_l1", "distill_ce"])
def test_second_backward_is_refused(op, device):
    """The stored gradient is scaled in place, so a second backward through the same graph would scale
    it twice: autograd's saved-tensor version check stops it instead."""
    x = torch.randn(3, 20, device=device, requires_grad=True)
    if op == "masked_l1":
        loss = ops.masked_l1_loss(x, torch.randn(3, 20, device=device), x.detach() > 0, backend="triton")
    else:
        loss = ops.centered_softmax_cross_entropy(x, torch.randn(3, 20, device=device), torch.zeros(20, device=device),
                                                  0.1, 0.04, backend="triton").loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_opcheck_gmml(device):
    x = torch.randn(2, 1, 9, 8, device=device)
    blocks = _blocks(2, 9, 8, device)
    args = (x, blocks.boxes, blocks.alien, blocks.source, 4)
    torch.library.opcheck(torch.ops.asit.gmml_corrupt.default, args)


@pytest.mark.slow
def test_compile_fullgraph_three_ops(device):
    b, h, w, p, k = 2, 12, 10, 4, 24

    def step(x, blocks, pred, student, teacher, center, tt):
        g = ops.gmml_corrupt(x, blocks, p, backend="triton")
        l1 = ops.masked_l1_loss(pred, x, g.mask, backend="triton")
        ce = ops.centered_softmax_cross_entropy(student, teacher, center, 0.1, tt, g.token_fraction[0],
                                                backend="triton")
        return l1 + ce.loss, ce.teacher_sum, g.corrupted

    x = torch.randn(b, 1, h, w, device=device)
    blocks = _blocks(b, h, w, device)
    student = torch.randn((h // p) * (w // p), k, device=device)
    teacher, center = torch.randn_like(student), torch.randn(k, device=device)
    pred = torch.randn_like(x)
    tt = torch.tensor(0.04, device=device)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        pr, st = pred.clone().requires_grad_(), student.clone().requires_grad_()
        loss, tsum, corrupted = fn(x, blocks, pr, st, teacher, center, tt)
        loss.backward()
        results.append((loss, tsum, corrupted, pr.grad, st.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- backend selection

@pytest.fixture
def spies(monkeypatch):
    called = []
    for name in ("masked_l1_loss_triton", "centered_softmax_cross_entropy_triton", "gmml_corrupt_triton"):
        real = getattr(_triton, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            called.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(_triton, name, spy)
    return called


def _call_all(device, backend=None):
    x = torch.randn(2, 1, 8, 8, device=device)
    mask = torch.rand(2, 1, 8, 8, device=device) < 0.5
    ops.masked_l1_loss(x, x * 0.5, mask, backend=backend)
    s = torch.randn(2, 9, device=device)
    ops.centered_softmax_cross_entropy(s, s, torch.zeros(9, device=device), 0.1, 0.04, backend=backend)
    ops.gmml_corrupt(x, _blocks(2, 8, 8, device), 4, backend=backend)


def test_backend_argument_forces_triton(spies, monkeypatch):
    monkeypatch.delenv("ASIT_OPS_BACKEND", raising=False)
    _call_all(torch.device("cpu"), backend="triton")
    assert len(spies) == 3


def test_env_variable_forces_triton(spies, monkeypatch):
    monkeypatch.setenv("ASIT_OPS_BACKEND", "triton")
    _call_all(torch.device("cpu"))
    assert len(spies) == 3


def test_auto_on_cpu_uses_reference(spies, monkeypatch):
    monkeypatch.delenv("ASIT_OPS_BACKEND", raising=False)
    _call_all(torch.device("cpu"), backend="auto")
    _call_all(torch.device("cpu"))
    assert spies == []


# ---------------------------------------------------------------- validation messages

def test_validation_names_the_argument():
    s = torch.randn(3, 10)
    c = torch.zeros(10)
    with pytest.raises(ValueError, match="student"):
        ops.centered_softmax_cross_entropy(s[None], s[None], c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="teacher shape"):
        ops.centered_softmax_cross_entropy(s, s[:2], c, 0.1, 0.04, backend="triton")
    with pytest.raises(TypeError, match="student"):
        ops.centered_softmax_cross_entropy(s.long(), s.long(), c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="student_temp"):
        ops.centered_softmax_cross_entropy(s, s, c, -0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="teacher_temp"):
        ops.centered_softmax_cross_entropy(s, s, c, 0.1, float("inf"), backend="triton")
    with pytest.raises(ValueError, match="center"):
        ops.centered_softmax_cross_entropy(s, s, torch.zeros(9), 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="weights"):
        ops.centered_softmax_cross_entropy(s, s, c, 0.1, 0.04, torch.ones(4), backend="triton")
    with pytest.raises(ValueError, match="teacher is on meta"):
        ops.centered_softmax_cross_entropy(s, s.to("meta"), c, 0.1, 0.04, backend="triton")

    x = torch.randn(2, 1, 6, 6)
    with pytest.raises(TypeError, match="pred"):
        ops.masked_l1_loss(x.long(), x.long(), x > 0, backend="triton")
    with pytest.raises(ValueError, match="target shape"):
        ops.masked_l1_loss(x, x[:1], x > 0, backend="triton")
    with pytest.raises(ValueError, match="mask shape"):
        ops.masked_l1_loss(x, x, torch.ones(3, 1, 6, 6, dtype=torch.bool), backend="triton")
    with pytest.raises(ValueError, match="mask is on meta"):
        ops.masked_l1_loss(x, x, (x > 0).to("meta"), backend="triton")

    blocks = _blocks(2, 6, 6, torch.device("cpu"))
    with pytest.raises(ValueError, match="x must have 4"):
        ops.gmml_corrupt(x[0], blocks, backend="triton")
    with pytest.raises(TypeError, match="x has dtype"):
        ops.gmml_corrupt(x.long(), blocks, backend="triton")
    with pytest.raises(ValueError, match="blocks.boxes"):
        ops.gmml_corrupt(x, blocks._replace(boxes=blocks.boxes[:1]), backend="triton")
    with pytest.raises(ValueError, match="blocks.boxes is on meta"):
        ops.gmml_corrupt(x, blocks._replace(boxes=blocks.boxes.to("meta")), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        ops.gmml_corrupt(x, blocks, backend="cuda")


# ---------------------------------------------------------------- centre update across 2 ranks

def _teacher_rows(rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + rank)
    return torch.randn(3 + 2 * rank, 33, generator=gen)  # ranks hold different row counts


def _center_worker(rank: int, world: int, init_file: str, out_dir: str, seed: int) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher = _teacher_rows(rank, seed)
        out = ops.centered_softmax_cross_entropy(teacher, teacher, torch.zeros(33), 0.1, 0.04,
                                                 backend="triton")
        center = torch.linspace(-1, 1, 33)
        ops.update_center_(center, out.teacher_sum, teacher.shape[0], 0.9, all_reduce=True)
        torch.save(center, os.path.join(out_dir, f"center{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_center_update_two_process_gloo(tmp_path, seed):
    mp.spawn(_center_worker, args=(2, str(tmp_path / "init"), str(tmp_path), seed), nprocs=2, join=True)
    c0, c1 = (torch.load(tmp_path / f"center{r}.pt", weights_only=True) for r in range(2))
    assert torch.equal(c0, c1), f"seed={seed}"
    rows = torch.cat([_teacher_rows(r, seed) for r in range(2)]).double()
    expect = 0.9 * torch.linspace(-1, 1, 33).double() + 0.1 * rows.mean(0)
    torch.testing.assert_close(c0.double(), expect, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")


def test_host_block_arithmetic_matches_triton() -> None:
    """The launchers' plain cdiv / next_power_of_2 (cheaper than calling Triton's @jit helpers from
    Python) give Triton's values."""
    import triton
    from asit_kernels._utils import cdiv, next_power_of_2

    for n in [0, 1, 2, 3, 5, 16, 17, 1000, 1023, 1024, 1025, 37_888 * 1024]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 1024):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
