"""Centred softmax cross-entropy kernel (asit_kernels.distill_ce) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from asit.ops import centered_softmax_cross_entropy, centered_softmax_cross_entropy_reference

SHAPES = [(5, 1000), (3, 1023), (2, 8192), (11, 37)]


def _expr(student, teacher, center, ts, tt, dtype):
    """Per-row loss as a plain PyTorch expression evaluated in ``dtype`` (the error yardstick)."""
    p = torch.softmax((teacher.to(dtype) - center.to(dtype)) / tt, dim=-1)
    return -(p * torch.log_softmax(student.to(dtype) / ts, dim=-1)).sum(-1)


def _inputs(n, k, dtype, device):
    student = (3 * torch.randn(n, k, device=device)).to(dtype).requires_grad_()
    teacher = (2 * torch.randn(n, k, device=device)).to(dtype)
    center = 0.5 * torch.randn(k, device=device)
    return student, teacher, center


def _run(student, teacher, center, ts, tt, weights, reduction, upstream, backend):
    s = student.detach().clone().requires_grad_()
    out = centered_softmax_cross_entropy(s, teacher, center, ts, tt, weights, reduction=reduction,
                                         backend=backend)
    (out.loss * upstream).sum().backward()
    return out, s.grad


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction,weighted", [("mean", False), ("mean", True), ("none", True)])
def test_matches_fp64_reference(n, k, dtype, reduction, weighted, device, seed, poison):
    student, teacher, center = _inputs(n, k, dtype, device)
    weights = torch.rand(n, device=device) if weighted else None
    ts, tt = 0.1, torch.tensor(0.04, device=device)
    upstream = torch.rand(n if reduction == "none" else (), device=device) + 0.5  # not 1
    out, grad = _run(student, teacher, center, ts, tt, weights, reduction, upstream, "triton")

    s64 = student.detach().double()
    w64 = None if weights is None else weights.double()
    ref, grad64 = _run(s64, teacher.double(), center.double(), ts, tt.double(), w64, reduction,
                       upstream.double(), "reference")
    assert out.loss.dtype == torch.float32 and out.loss.shape == ref.loss.shape
    assert grad.dtype == dtype and torch.isfinite(grad).all(), f"seed={seed}"
    torch.testing.assert_close(out.teacher_sum.double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"seed={seed}: {m}")
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"seed={seed}: {m}")
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"seed={seed}: {m}")
    else:  # error vs fp64 at most 2x that of the same-dtype PyTorch expression, plus a small atol
        rows64 = _expr(s64, teacher.double(), center.double(), ts, tt.double(), torch.float64)
        rows_bf = _expr(student.detach(), teacher, center, ts, tt.to(dtype), dtype).double()
        rows_k = centered_softmax_cross_entropy(student.detach(), teacher, center, ts, tt, reduction="none",
                                                backend="triton").loss.double()
        own = (rows_bf - rows64).abs()
        assert ((rows_k - rows64).abs() <= 2 * own + 1e-4 * rows64.abs().clamp_min(1)).all(), f"seed={seed}"
        s_bf = student.detach().clone().requires_grad_()
        w = torch.ones(n, device=device) if weights is None else weights
        rows = _expr(s_bf, teacher, center, ts, tt.to(dtype), dtype)
        loss_bf = rows * w.to(dtype)
        if reduction == "mean":
            loss_bf = loss_bf.sum() / w.sum().to(dtype)
        (loss_bf * upstream.to(dtype)).sum().backward()
        own_g = (s_bf.grad.double() - grad64).abs().max()
        # two bf16 ulps: the gradient is stored in bf16 by the forward and again after the backward's
        # scaling, and the interpreter's fp32->bf16 conversion truncates instead of rounding
        atol = 2.0**-6 * grad64.abs().max()
        assert (grad.double() - grad64).abs().max() <= 2 * own_g + atol, f"seed={seed}"


def test_largest_k(device, seed, poison):
    student, teacher, center = _inputs(2, 65536, torch.float32, device)
    out, grad = _run(student, teacher, center, 0.1, 0.07, None, "mean", torch.tensor(2.0), "triton")
    ref, grad_ref = _run(student, teacher, center, 0.1, 0.07, None, "mean", torch.tensor(2.0), "reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out.teacher_sum, ref.teacher_sum, rtol=1e-5, atol=1e-4)


def test_all_zero_weights(device, seed, poison):
    student, teacher, center = _inputs(4, 100, torch.float32, device)
    weights = torch.zeros(4, device=device)
    out, grad = _run(student, teacher, center, 0.1, 0.04, weights, "mean", torch.tensor(1.5), "triton")
    assert out.loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_noncontiguous_inputs_and_2d_center(device, seed, poison):
    big = torch.randn(6, 300, device=device)
    student = big[1:5, :257].detach().requires_grad_()  # row-strided view
    teacher = torch.randn(257, 4, device=device).t()  # transposed: columns not adjacent
    center = torch.randn(1, 257, device=device)
    args = (student, teacher, center, torch.tensor(0.1), 0.05, None, "none", torch.rand(4, device=device) + 0.5)
    out, grad = _run(*args, "triton")
    ref, grad_ref = _run(*args, "reference")
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.teacher_sum, ref.teacher_sum, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", [(3, 300), (5, 2500)])  # one pass; split K (the loss from the statistics kernel)
def test_no_grad_path_matches(n, k, device, seed, poison):
    student, teacher, center = _inputs(n, k, torch.float32, device)
    with torch.no_grad():
        out = centered_softmax_cross_entropy(student, teacher, center, 0.1, 0.04, backend="triton")
    ref = centered_softmax_cross_entropy_reference(student.detach(), teacher, center, 0.1, 0.04)
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(out.teacher_sum, ref.teacher_sum, rtol=1e-5, atol=1e-5)


# (n, k, SPLIT_ROWS or None, SPLIT_FUSED_SUM_MAX_PARTS or None, the column-sum path it must take)
SUM_PATHS = [
    (70, 1000, None, None, "column_sum_kernel"),  # one pass: 18 partial rows in 2 groups of 16
    (20, 2100, None, None, "distill_ce_split_stats_kernel"),  # split: 2 row tiles x 33 splits, fused sum
    (20, 2100, 1, 4, "column_sum_kernel"),  # split, 20 one-row tiles: the separate sum, 2 groups
]


@pytest.mark.parametrize("n,k,split_rows,fused_max,summed_by", SUM_PATHS)
def test_teacher_sum_deterministic_across_row_groups(n, k, split_rows, fused_max, summed_by, monkeypatch, seed,
                                                     poison):
    """Teacher column sums reduced over several row groups / row tiles: float64-exact to the tolerance of
    fp32 sums, and bitwise identical (with the loss and gradient) on a second call."""
    import asit_kernels._utils as utils
    import asit_kernels.distill_ce as ce

    if split_rows is not None:
        monkeypatch.setattr(utils, "SPLIT_ROWS", split_rows)
        monkeypatch.setattr(ce, "SPLIT_FUSED_SUM_MAX_PARTS", fused_max)
    student, teacher, center = _inputs(n, k, torch.float32, "cpu")
    student = student.detach()
    temps = torch.tensor(0.1), torch.tensor(0.04)
    _, launches = ce.distill_ce_forward_launches(student, teacher, center, *temps)
    names = [launch.kernel.fn.__name__.strip("_") for launch in launches]
    assert summed_by in names and ("column_sum_kernel" in names) == (summed_by == "column_sum_kernel"), names
    sums = next(launch for launch in launches if launch.kernel.fn.__name__.strip("_") == summed_by)
    assert sums.grid[-1] > 1, sums.grid  # several groups (column sum) or several splits (fused sum)

    first = ce.distill_ce_forward(student, teacher, center, *temps)
    second = ce.distill_ce_forward(student, teacher, center, *temps)
    for a, b in zip(first, second):
        assert torch.equal(a, b), f"seed={seed}"
    ref = centered_softmax_cross_entropy_reference(student.double(), teacher.double(), center.double(), 0.1, 0.04,
                                                   reduction="none")
    torch.testing.assert_close(first[1].double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4,
                               msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(first[0].double(), ref.loss, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed}: {m}")


def _ticket_counters(launches):
    """The int32 ticket-counter arguments of a launch list."""
    return [a for launch in launches for a in launch.args if isinstance(a, torch.Tensor) and a.dtype == torch.int32]


def test_each_forward_gets_its_own_zeroed_counters(seed):
    """Counters are allocated per forward: zero when the launches are built, one buffer for all of a forward's
    launches, never the buffer of another forward (a CUDA graph or another stream may still be using that)."""
    import asit_kernels.distill_ce as ce

    temps = torch.tensor(0.1), torch.tensor(0.04)
    for n, k in [(70, 1000), (20, 2100)]:  # one pass + column sum; split K (fused sum)
        student, teacher, center = _inputs(n, k, torch.float32, "cpu")
        first = _ticket_counters(ce.distill_ce_forward_launches(student.detach(), teacher, center, *temps)[1])
        second = _ticket_counters(ce.distill_ce_forward_launches(student.detach(), teacher, center, *temps)[1])
        assert first and len({c.untyped_storage().data_ptr() for c in first}) == 1, (n, k)
        assert first[0].untyped_storage().data_ptr() != second[0].untyped_storage().data_ptr(), (n, k)
        assert not any(c.any() for c in first + second), (n, k)


def test_launch_with_more_counters_than_any_before(monkeypatch, seed, poison):
    """A forward needing more ticket counters than every earlier one (K = 65,536 on a split K with the
    separate column sum: 1 row tile + 2,048 column blocks, more than the 1,024 a shared buffer once held)
    matches float64 (loss, teacher_sum, gradient after an upstream gradient that is not 1), and a small
    forward gives bitwise the same result before and after it."""
    import asit_kernels.distill_ce as ce

    monkeypatch.setattr(ce, "SPLIT_FUSED_SUM_MAX_PARTS", 0)  # the column-sum kernel, one counter per 32 columns
    temps = torch.tensor(0.1), torch.tensor(0.04)

    def forward(student, teacher, center, upstream):
        loss, teacher_sum, grad = ce.distill_ce_forward(student, teacher, center, *temps)
        ce.distill_ce_backward(grad, upstream)
        s64 = student.double().requires_grad_()
        ref = centered_softmax_cross_entropy_reference(s64, teacher.double(), center.double(), 0.1, 0.04,
                                                       reduction="none")
        (ref.loss * upstream.double()).sum().backward()
        torch.testing.assert_close(loss.double(), ref.loss.detach(), rtol=2e-5, atol=2e-5,
                                   msg=lambda m: f"seed={seed}: {m}")
        torch.testing.assert_close(teacher_sum.double(), teacher.double().sum(0), rtol=1e-5, atol=1e-4,
                                   msg=lambda m: f"seed={seed}: {m}")
        torch.testing.assert_close(grad.double(), s64.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"seed={seed}: {m}")
        return loss, teacher_sum, grad

    small = [t.detach() for t in _inputs(3, 2100, torch.float32, "cpu")] + [torch.rand(3) + 0.5]
    big = [t.detach() for t in _inputs(3, 65536, torch.float32, "cpu")] + [torch.rand(3) + 0.5]
    counters = [_ticket_counters(ce.distill_ce_forward_launches(*x[:3], *temps)[1])[0].numel() for x in (small, big)]
    assert counters[1] == 1 + 65536 // 32 and counters[1] > max(1024, counters[0]), counters
    before = forward(*small)
    forward(*big)
    after = forward(*small)
    for a, b in zip(before, after):
        assert torch.equal(a, b), f"seed={seed}"
