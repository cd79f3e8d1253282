"""Fused output layer + centred softmax cross-entropy (asit.ops.linear_centered_softmax_cross_entropy)
against its PyTorch reference: float64 oracle, bf16 rule, weights, gradients, registration, determinism."""

from __future__ import annotations

import pytest
import torch

import asit.ops as ops
from asit.ops import (
    _triton,  # registers the asit:: ops
    centered_softmax_cross_entropy_reference,
    linear_centered_softmax_cross_entropy,
    linear_centered_softmax_cross_entropy_reference,
)

N, D, K, CHUNK = 37, 24, 50, 16  # three chunks, the last one ragged
UPSTREAM = 0.37


def _inputs(dtype, device, *, n=N, d=D, k=K, distinct_teacher=False):
    h_s = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1)
    h_t = torch.nn.functional.normalize(torch.randn(n, d, device=device), dim=-1)
    # rows of norm 2: cosine-like logits, as the weight-normalised output layer gives (|logit| <= 2)
    weight = 2 * torch.nn.functional.normalize(torch.randn(k, d, device=device), dim=-1)
    teacher_weight = 2 * torch.nn.functional.normalize(torch.randn(k, d, device=device), dim=-1)
    teacher_weight = teacher_weight if distinct_teacher else None
    center = 0.5 * torch.randn(k, device=device)
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(h_s), cast(h_t), cast(weight), cast(teacher_weight), center


def _weights(kind, n, device):
    if kind is None:
        return None
    w = torch.rand(n, device=device)
    if kind == "some_zero":
        w[::3] = 0
    elif kind == "all_zero":
        w.zero_()
    return w


def _run(fn, h_s, h_t, weight, teacher_weight, center, ts, tt, weights, **kwargs):
    """Loss, teacher sums and the gradients of ``UPSTREAM * loss`` for h_s and weight (fresh leaves)."""
    hs = h_s.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(hs, h_t, w, center, ts, tt, weights, teacher_weight=teacher_weight, **kwargs)
    (out.loss * UPSTREAM).backward()
    return out, hs.grad, w.grad


def _fused(*args, **kwargs):
    return linear_centered_softmax_cross_entropy(*args, chunk_rows=CHUNK, backend="triton", **kwargs)


def _bf16_expr(h_s, h_t, weight, teacher_weight, center, ts, tt, weights):
    """The unfused expression in bf16 throughout (the error yardstick), with its gradients."""
    hs = h_s.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    tw = weight if teacher_weight is None else teacher_weight
    s = hs @ w.T
    t = h_t @ tw.T
    p = torch.softmax((t - center.to(s.dtype)) / tt, dim=-1)
    rows = -(p * torch.log_softmax(s / ts, dim=-1)).sum(-1)
    wts = torch.ones(h_s.shape[0], device=h_s.device) if weights is None else weights
    loss = (rows * wts.to(rows.dtype)).sum() / wts.sum().clamp_min(1e-30).to(rows.dtype)
    (loss * UPSTREAM).backward()
    return rows.detach(), hs.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_kind", [None, "some_zero", "all_zero"])
@pytest.mark.parametrize("distinct_teacher", [False, True])
def test_matches_fp64_reference(dtype, weight_kind, distinct_teacher, device, seed, poison):
    h_s, h_t, weight, teacher_weight, center = _inputs(dtype, device, distinct_teacher=distinct_teacher)
    weights = _weights(weight_kind, N, device)
    ts, tt = 0.1, torch.tensor(0.04, device=device)
    out, g_h, g_w = _run(_fused, h_s, h_t, weight, teacher_weight, center, ts, tt, weights)

    def d64(t):
        return None if t is None else t.double()

    ref, g_h64, g_w64 = _run(linear_centered_softmax_cross_entropy_reference, d64(h_s), d64(h_t), d64(weight),
                             d64(teacher_weight), d64(center), ts, tt.double(), d64(weights))
    msg = f"seed={seed}"
    assert out.loss.dtype == torch.float32 and out.loss.shape == ()
    assert g_h.dtype == dtype and g_w.dtype == dtype and out.teacher_sum.dtype == torch.float32
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all() and torch.isfinite(out.teacher_sum).all(), msg
    if weight_kind == "all_zero":
        assert out.loss.item() == 0.0
        assert torch.equal(g_h, torch.zeros_like(g_h)) and torch.equal(g_w, torch.zeros_like(g_w))
    tw = weight if teacher_weight is None else teacher_weight
    logits_t = (h_t @ tw.T).double()  # the teacher logits as the unfused op computes them (bf16: rounded)
    # bf16: a matmul of other row count may round a logit to the neighbouring bf16 value (2^-7 at |logit| <= 2)
    atol = 1e-4 if dtype == torch.float32 else 2.0**-6
    torch.testing.assert_close(out.teacher_sum.double(), logits_t.sum(0), rtol=1e-5, atol=atol,
                               msg=lambda m: f"{msg}: {m}")
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss.double(), ref.loss, rtol=2e-5, atol=2e-5, msg=lambda m: f"{msg}: {m}")
        for got, want in ((g_h, g_h64), (g_w, g_w64)):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-9,
                                       msg=lambda m: f"{msg}: {m}")
        return
    # bf16: error vs fp64 at most 2x that of the same-dtype PyTorch expression, plus a small atol. The losses
    # are compared by their mean error over rows: both carry the bf16 rounding of the logits, which the
    # sharp teacher (τt = 0.04) amplifies differently from row to row.
    rows64 = linear_centered_softmax_cross_entropy_reference(d64(h_s), d64(h_t), d64(weight), d64(center), ts,
                                                             tt.double(), teacher_weight=d64(teacher_weight),
                                                             reduction="none").loss
    rows_bf, gh_bf, gw_bf = _bf16_expr(h_s, h_t, weight, teacher_weight, center, ts, tt.to(dtype), weights)
    with torch.no_grad():
        rows_k = _fused(h_s, h_t, weight, center, ts, tt, teacher_weight=teacher_weight, reduction="none").loss
    own = (rows_bf.double() - rows64).abs().mean()
    assert (rows_k.double() - rows64).abs().mean() <= 2 * own + 1e-3 * rows64.abs().mean().clamp_min(1), msg
    for got, mine, want in ((g_h, gh_bf, g_h64), (g_w, gw_bf, g_w64)):
        own_g = (mine.double() - want).abs().max()
        atol = 2.0**-6 * want.abs().max()
        assert (got.double() - want).abs().max() <= 2 * own_g + atol, msg


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_kind", [None, "binary"])
def test_gradients_are_rounded_once_from_fp32(dtype, weight_kind, device, seed, monkeypatch):
    """dh = s·G·W and dW = Σ_chunks (s·G)ᵀ·h, with G the CE kernel's own logit gradient (in the logits' dtype),
    equal their float64 values rounded once to the output dtype: the products are fp32, dW is summed over the
    chunks in fp32 and the mean's factor s is applied in fp32. (Rounding each chunk's product, or h·s, to the
    compute dtype, or dh before the factor, breaks this bound.)"""
    grads = []
    real = _triton.distill_ce_forward

    def spy(*args):
        out = real(*args)
        grads.append(out[2].clone())  # the op scales its copy in place afterwards
        return out

    monkeypatch.setattr(_triton, "distill_ce_forward", spy)
    n = 96
    h_s, h_t, weight, _, center = _inputs(dtype, device, n=n)
    weights = None if weight_kind is None else (torch.rand(n, device=device) < 0.7).float()  # exact in any dtype
    hs, w = h_s.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_centered_softmax_cross_entropy(hs, h_t, w, center, 0.1, 0.04, weights, chunk_rows=8,
                                                backend="triton")
    (out.loss * 0.5).backward()  # a power of two: the upstream factor rounds nothing
    assert len(grads) == n // 8
    g = torch.cat(grads).double()
    s = torch.full((n,), 1.0 / n, dtype=torch.float64, device=device) if weights is None else (
        weights.double() / weights.double().sum())
    want_h = 0.5 * s[:, None] * (g @ weight.double())
    want_w = 0.5 * (g * s[:, None]).T @ h_s.double()
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half an ulp, relative
    for name, got, want in (("dW", w.grad, want_w), ("dh", hs.grad, want_h)):
        err = (got.double() - want).abs()
        bound = unit * want.abs() + 1e-5 * want.abs().max()
        assert (err <= bound).all(), f"seed={seed}: {name} max excess {(err - bound).max().item():.3g}"


def test_reduction_none_is_forward_only(device, seed, poison):
    h_s, h_t, weight, teacher_weight, center = _inputs(torch.float32, device, distinct_teacher=True)
    weights = _weights("some_zero", N, device)
    with torch.no_grad():
        out = _fused(h_s, h_t, weight, center, 0.1, 0.05, weights, teacher_weight=teacher_weight, reduction="none")
    ref = linear_centered_softmax_cross_entropy_reference(h_s, h_t, weight, center, 0.1, 0.05, weights,
                                                          teacher_weight=teacher_weight, reduction="none")
    assert out.loss.shape == (N,) and not out.loss.requires_grad
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-5, atol=2e-5, msg=lambda m: f"seed={seed}: {m}")
    torch.testing.assert_close(out.teacher_sum, ref.teacher_sum, rtol=1e-5, atol=1e-4)
    for backend in ("triton", "reference"):
        with pytest.raises(ValueError, match="reduction='none' is forward only"):
            linear_centered_softmax_cross_entropy(h_s.requires_grad_(), h_t, weight, center, 0.1, 0.05,
                                                  reduction="none", backend=backend)


def test_equals_unfused_op_and_default_chunks(device, seed, poison):
    """The public op on the reference and fused paths equals the CE op on the full logits; one chunk
    (the default size) and many chunks agree."""
    h_s, h_t, weight, _, center = _inputs(torch.float32, device)
    full = centered_softmax_cross_entropy_reference(h_s @ weight.T, h_t @ weight.T, center, 0.1, 0.04)
    for kwargs in ({"backend": "reference"}, {"backend": "triton"}, {"backend": "triton", "chunk_rows": 5}):
        with torch.no_grad():
            out = linear_centered_softmax_cross_entropy(h_s, h_t, weight, center, 0.1, 0.04, **kwargs)
        torch.testing.assert_close(out.loss, full.loss, rtol=2e-5, atol=2e-5, msg=lambda m, kw=kwargs: f"{kw}: {m}")
        torch.testing.assert_close(out.teacher_sum, full.teacher_sum, rtol=1e-5, atol=1e-4)


def test_logits_are_made_in_chunks(device, monkeypatch):
    """The CE kernel sees one chunk of logits at a time (never N x K), in the default chunk size when none is
    given: 4,096 rows, fewer when a chunk's logits would pass 32 MB."""
    from asit.ops.linear_distill_ce import default_chunk_rows

    seen = []
    real = _triton.distill_ce_forward

    def spy(student, teacher, *args):
        seen.append((tuple(student.shape), tuple(teacher.shape)))
        return real(student, teacher, *args)

    monkeypatch.setattr(_triton, "distill_ce_forward", spy)
    h_s, h_t, weight, _, center = _inputs(torch.float32, device)
    (_fused(h_s, h_t, weight.requires_grad_(), center, 0.1, 0.04).loss * UPSTREAM).backward()
    assert seen == [((16, K), (16, K)), ((16, K), (16, K)), ((5, K), (5, K))]
    assert default_chunk_rows(1024, torch.bfloat16) == 4096
    assert default_chunk_rows(65536, torch.bfloat16) == 256  # 256 x 65,536 x 2 bytes = 32 MB
    assert default_chunk_rows(2**26, torch.float32) == 1


def test_only_weight_or_only_features_require_grad(device, seed):
    h_s, h_t, weight, _, center = _inputs(torch.float32, device)
    ref_h, ref_w = (_run(linear_centered_softmax_cross_entropy_reference, h_s, h_t, weight, None, center,
                         0.1, 0.04, None))[1:]
    w = weight.clone().requires_grad_()
    (_fused(h_s, h_t, w, center, 0.1, 0.04).loss * UPSTREAM).backward()
    torch.testing.assert_close(w.grad, ref_w, rtol=1e-4, atol=1e-6)
    hs = h_s.clone().requires_grad_()
    (_fused(hs, h_t, weight, center, 0.1, 0.04).loss * UPSTREAM).backward()
    torch.testing.assert_close(hs.grad, ref_h, rtol=1e-4, atol=1e-6)


def test_gradient_flows_into_weight_norm_parameters(device, seed):
    """The weight is the effective weight of a weight-normalised layer: autograd continues into g and v."""
    from asit.models.heads import WeightNormLinear

    layer = WeightNormLinear(D, K, trainable_g=True).to(device)
    h_s, h_t, _, _, center = _inputs(torch.float32, device)
    grads = []
    for fn in (linear_centered_softmax_cross_entropy_reference, _fused):
        layer.zero_grad(set_to_none=True)
        (fn(h_s, h_t, layer.weight, center, 0.1, 0.04).loss * UPSTREAM).backward()
        grads.append((layer.weight_g.grad.clone(), layer.weight_v.grad.clone()))
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_deterministic(device, seed):
    h_s, h_t, weight, teacher_weight, center = _inputs(torch.float32, device, distinct_teacher=True)
    weights = _weights("some_zero", N, device)
    runs = [_run(_fused, h_s, h_t, weight, teacher_weight, center, 0.1, 0.04, weights) for _ in range(2)]
    (a, ga_h, ga_w), (b, gb_h, gb_w) = runs
    for x, y in ((a.loss, b.loss), (a.teacher_sum, b.teacher_sum), (ga_h, gb_h), (ga_w, gb_w)):
        assert torch.equal(x, y)


def test_second_backward_is_refused(device):
    h_s, h_t, weight, _, center = _inputs(torch.float32, device)
    hs = h_s.requires_grad_()
    loss = _fused(hs, h_t, weight, center, 0.1, 0.04).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autocast_uses_the_autocast_dtype(seed):
    h_s, h_t, weight, _, center = _inputs(torch.float32, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = _run(_fused, h_s, h_t, weight, None, center, 0.1, 0.04, None)
        ref = _run(linear_centered_softmax_cross_entropy_reference, h_s, h_t, weight, None, center, 0.1, 0.04, None)
    assert fused[1].dtype == torch.float32 and fused[2].dtype == torch.float32  # the inputs' dtypes
    logits_t = (h_t.bfloat16() @ weight.bfloat16().T).float()  # the teacher logits are bf16 under autocast
    torch.testing.assert_close(fused[0].teacher_sum, logits_t.sum(0), rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fused[0].loss, ref[0].loss, rtol=1e-2, atol=1e-2)
    for got, want in zip(fused[1:], ref[1:], strict=True):
        assert (got - want).abs().max() <= 2.0**-5 * want.abs().max(), f"seed={seed}"


def test_validation_names_the_argument():
    h = torch.randn(6, 8)
    w = torch.randn(10, 8)
    c = torch.zeros(10)
    f = linear_centered_softmax_cross_entropy
    with pytest.raises(ValueError, match="h_s must have 2"):
        f(h[None], h, w, c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="h_t shape"):
        f(h, h[:5], w, c, 0.1, 0.04, backend="triton")
    with pytest.raises(TypeError, match="weight has dtype"):
        f(h, h, w.long(), c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="D = 8"):
        f(h, h, torch.randn(10, 7), c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="teacher_weight shape"):
        f(h, h, w, c, 0.1, 0.04, teacher_weight=torch.randn(9, 8), backend="triton")
    with pytest.raises(ValueError, match="center must have 10"):
        f(h, h, w, torch.zeros(9), 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="student_temp"):
        f(h, h, w, c, 0.0, 0.04, backend="triton")
    with pytest.raises(ValueError, match="weights must have 6"):
        f(h, h, w, c, 0.1, 0.04, torch.ones(5), backend="triton")
    with pytest.raises(TypeError, match="weights has dtype"):
        f(h, h, w, c, 0.1, 0.04, torch.ones(6, dtype=torch.long), backend="triton")
    with pytest.raises(ValueError, match="weights is on meta"):
        f(h, h, w, c, 0.1, 0.04, torch.ones(6, device="meta"), backend="triton")
    with pytest.raises(ValueError, match="reduction"):
        f(h, h, w, c, 0.1, 0.04, reduction="sum", backend="triton")
    with pytest.raises(ValueError, match="chunk_rows"):
        f(h, h, w, c, 0.1, 0.04, chunk_rows=0, backend="triton")
    with pytest.raises(ValueError, match="weight is on meta"):
        f(h, h, w.to("meta"), c, 0.1, 0.04, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        f(h, h, w, c, 0.1, 0.04, backend="cuda")


def test_fp64_and_auto_on_cpu_use_the_reference(monkeypatch):
    called = []
    real = _triton.linear_centered_softmax_cross_entropy_triton
    monkeypatch.setattr(_triton, "linear_centered_softmax_cross_entropy_triton",
                        lambda *a, **k: called.append(1) or real(*a, **k))
    monkeypatch.delenv("ASIT_OPS_BACKEND", raising=False)
    h, w, c = torch.randn(4, 8), torch.randn(6, 8), torch.zeros(6)
    ops.linear_centered_softmax_cross_entropy(h.double(), h.double(), w.double(), c.double(), 0.1, 0.04,
                                              backend="triton")
    ops.linear_centered_softmax_cross_entropy(h, h, w, c, 0.1, 0.04)
    assert called == []
    ops.linear_centered_softmax_cross_entropy(h, h, w, c, 0.1, 0.04, backend="triton")
    assert called == [1]


# ---------------------------------------------------------------- registration


def _op_args(device, grad=True):
    h_s, h_t, weight, teacher_weight, center = _inputs(torch.float32, device, n=11, d=8, k=20, distinct_teacher=True)
    temps = (torch.tensor(0.1, device=device), torch.tensor(0.04, device=device))
    return (h_s.requires_grad_(grad), h_t, weight.requires_grad_(grad), teacher_weight, center, *temps,
            torch.rand(11, device=device), torch.float32, 4, grad, grad)


def test_opcheck(device):
    op = torch.ops.asit.linear_distill_ce.default
    # The forward returns the stored gradients, which the backward scales in place: as for asit::distill_ce,
    # opcheck's AOT test (which hands every output to the caller) is left out while gradients are stored.
    torch.library.opcheck(op, _op_args(device), test_utils=("test_schema", "test_autograd_registration",
                                                            "test_faketensor"))
    torch.library.opcheck(op, _op_args(device, grad=False))
    args = _op_args(device)
    torch.library.opcheck(torch.ops.asit.linear_distill_ce_backward.default,
                          (torch.randn(11, 8, device=device), torch.randn(20, 8, device=device),
                           torch.tensor(0.37, device=device)))

    def fn(h_s, weight, *rest):  # the loss and teacher sums, as the public op hands them out
        out = op(h_s, rest[0], weight, *rest[1:])
        return out[1], out[2]

    results = []
    for run in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        hs, w = args[0].detach().clone().requires_grad_(), args[2].detach().clone().requires_grad_()
        loss, tsum = run(hs, w, args[1], *args[3:])
        (loss * UPSTREAM).backward()
        results.append((loss, tsum, hs.grad, w.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_compile_fullgraph(device, seed):
    h_s, h_t, weight, teacher_weight, center = _inputs(torch.float32, device, distinct_teacher=True)
    weights = _weights("some_zero", N, device)
    tt = torch.tensor(0.04, device=device)

    def step(h_s, weight):
        out = linear_centered_softmax_cross_entropy(h_s, h_t, weight, center, 0.1, tt, weights,
                                                    teacher_weight=teacher_weight, chunk_rows=CHUNK, backend="triton")
        return out.loss * UPSTREAM, out.teacher_sum

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        hs, w = h_s.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, tsum = fn(hs, w)
        loss.backward()
        results.append((loss, tsum, hs.grad, w.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7, msg=lambda m: f"seed={seed}: {m}")
