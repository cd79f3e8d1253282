"""Masked L1 kernel (asit_kernels.masked_l1) against the PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from asit.ops import masked_l1_loss, masked_l1_loss_reference

SHAPES = [((2, 1, 37, 29), (2, 1, 37, 29)), ((2, 3, 50, 33), (2, 1, 50, 33)), ((3, 7), (3, 7)),
          ((4, 2, 9, 5), (1, 1, 9, 5))]


def _expr(pred, target, mask, dtype):
    """The same loss as a plain PyTorch expression evaluated in ``dtype`` (the error yardstick)."""
    m = mask.to(dtype).expand(pred.shape)
    return ((pred.to(dtype) - target.to(dtype)).abs() * m).sum() / m.sum().clamp_min(1)


def _inputs(shape, mask_shape, dtype, device, mask_kind="bool"):
    pred = torch.randn(shape, device=device).to(dtype).requires_grad_()
    target = torch.randn(shape, device=device).to(dtype)
    mask = torch.rand(mask_shape, device=device) < 0.4
    if mask_kind == "float":
        mask = mask.float() * torch.rand(mask_shape, device=device)
    return pred, target, mask


@pytest.mark.parametrize("shape,mask_shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_fp64_reference(shape, mask_shape, dtype, deterministic, device, seed, poison):
    pred, target, mask = _inputs(shape, mask_shape, dtype, device)
    loss = masked_l1_loss(pred, target, mask, backend="triton", deterministic=deterministic)
    grad_out = torch.rand((), device=device) + 0.5  # not 1: catches a skipped grad_output multiply
    (loss * grad_out).backward()
    grad = pred.grad.clone()

    p64 = pred.detach().double().requires_grad_()
    ref = masked_l1_loss_reference(p64, target.double(), mask)
    (ref * grad_out.double()).backward()
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == dtype and grad.shape == pred.shape
    assert torch.isfinite(grad).all(), f"seed={seed}"

    if dtype == torch.float32:
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"seed={seed}: {m}")
        torch.testing.assert_close(grad.double(), p64.grad, rtol=1e-5, atol=1e-7)
    else:  # error vs fp64 at most 2x that of the same-dtype PyTorch expression, plus a small atol
        own = (_expr(pred.detach(), target, mask, dtype).double() - ref).abs()
        assert (loss.double() - ref).abs() <= 2 * own + 1e-5, f"seed={seed}"
        p_bf = pred.detach().clone().requires_grad_()
        (_expr(p_bf, target, mask, dtype) * grad_out.to(dtype)).backward()
        own_g = (p_bf.grad.double() - p64.grad).abs().max()
        # atol: storing the gradient in bf16 costs up to one ulp (2^-7 relative): the Triton
        # interpreter converts fp32 -> bf16 by truncation (GPUs round to nearest even).
        atol = 2.0**-7 * p64.grad.abs().max()
        assert (grad.double() - p64.grad).abs().max() <= 2 * own_g + atol, f"seed={seed}"


@pytest.mark.parametrize("kind", ["empty", "full"])
def test_empty_and_full_mask(kind, device, seed, poison):
    pred = torch.randn(2, 1, 11, 13, device=device, requires_grad=True)
    target = torch.randn(2, 1, 11, 13, device=device)
    mask = torch.full((2, 1, 11, 13), kind == "full", device=device)
    loss = masked_l1_loss(pred, target, mask, backend="triton")
    loss.backward()
    if kind == "empty":
        assert loss.item() == 0.0
        assert torch.equal(pred.grad, torch.zeros_like(pred))
    else:
        ref = (pred.detach().double() - target.double()).abs().mean()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


def test_float_mask_noncontiguous_and_target_grad(device, seed, poison):
    base = torch.randn(3, 2, 20, 34, device=device)
    pred = base[:, :, :, ::2].transpose(2, 3).detach().requires_grad_()  # [3, 2, 17, 20], strided
    target = torch.randn(3, 2, 20, 17, device=device).transpose(2, 3).detach().requires_grad_()
    mask = torch.rand(3, 1, 17, 20, device=device)  # float weights
    loss = masked_l1_loss(pred, target, mask, backend="triton")
    loss.backward(torch.tensor(3.0))
    p2, t2 = pred.detach().clone().requires_grad_(), target.detach().clone().requires_grad_()
    ref = masked_l1_loss_reference(p2, t2, mask)
    ref.backward(torch.tensor(3.0))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred.grad, p2.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(target.grad, t2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                                     (torch.float16, torch.float32)])
def test_mixed_dtypes_match_fp64(pred_dtype, target_dtype, mask_kind, device, seed, poison):
    """Each input is read in its own dtype (no cast at the call site): an fp32 target against a bf16
    prediction is compared with float64 from those exact values, with an upstream gradient != 1."""
    pred, target, mask = _inputs((2, 3, 41, 29), (2, 1, 41, 29), pred_dtype, device, mask_kind)
    target = torch.randn(target.shape, device=device).to(target_dtype)
    loss = masked_l1_loss(pred, target, mask, backend="triton")
    grad_out = torch.rand((), device=device) * 3 + 0.5
    loss.backward(grad_out)
    p64 = pred.detach().double().requires_grad_()
    ref = _expr(p64, target.double(), mask.double(), torch.float64)
    (ref * grad_out.double()).backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")
    # the reference twin reads the target in its own dtype too
    torch.testing.assert_close(masked_l1_loss_reference(pred.detach(), target, mask).double(), ref,
                               rtol=1e-5, atol=1e-6)
    assert pred.grad.dtype == pred_dtype and torch.isfinite(pred.grad).all()
    # the stored gradient sign · mask is in pred's dtype and scaled in place: two roundings (truncations
    # in the interpreter) of at most one ulp each, 2^-6 relative for bf16, 2^-8 for fp16 (whose
    # subnormals, below 2^-14, are spaced 2^-24 apart)
    rel, atol = {torch.bfloat16: (2.0**-6, 0.0), torch.float16: (2.0**-8, 2.0**-23)}.get(pred_dtype, (1e-6, 0.0))
    err = (pred.grad.double() - p64.grad).abs()
    assert (err <= rel * p64.grad.abs() + atol + 1e-12).all(), f"seed={seed}: max err {err.max().item()}"


def test_target_grad_in_its_own_dtype(device, seed, poison):
    pred = torch.randn(2, 7, 9, device=device).bfloat16().requires_grad_()
    target = torch.randn(2, 7, 9, device=device, requires_grad=True)
    mask = torch.rand(2, 7, 9, device=device) < 0.5
    masked_l1_loss(pred, target, mask, backend="triton").backward(torch.tensor(2.0, device=device))
    assert target.grad.dtype == torch.float32
    torch.testing.assert_close(target.grad, -pred.grad.float())
    only_target = masked_l1_loss(pred.detach(), target.detach().requires_grad_(), mask, backend="triton")
    assert only_target.requires_grad


def test_no_grad_forward_writes_no_gradient(device, seed, poison):
    pred, target, mask = _inputs((3, 50), (3, 50), torch.float32, device)
    with torch.no_grad():
        loss = masked_l1_loss(pred, target, mask, backend="triton")
    torch.testing.assert_close(loss.double(), masked_l1_loss_reference(pred.double(), target.double(), mask),
                               rtol=1e-5, atol=1e-6)
    from asit.ops import _triton

    _, _, grad = _triton._masked_l1_op(pred.detach(), target, mask, False)
    assert grad.numel() == 0


def test_deterministic_is_repeatable(device, seed):
    pred, target, mask = _inputs((2, 3, 40, 30), (2, 1, 40, 30), torch.float32, device)
    a = masked_l1_loss(pred.detach(), target, mask, backend="triton", deterministic=True)
    b = masked_l1_loss(pred.detach(), target, mask, backend="triton")  # the reduction is always in order
    assert torch.equal(a, b)


def test_fp64_falls_back_to_reference(device):
    pred32 = torch.randn(2, 5, device=device)
    target64 = torch.randn(2, 5, dtype=torch.float64, device=device)
    mask = torch.rand(2, 5, device=device) < 0.5
    assert masked_l1_loss(pred32, target64, mask, backend="triton").dtype == torch.float64
    pred = torch.randn(2, 5, dtype=torch.float64, device=device)
    mask = torch.rand(2, 5, device=device) < 0.5
    out = masked_l1_loss(pred, pred * 0, mask, backend="triton")
    assert out.dtype == torch.float64
    assert torch.equal(out, masked_l1_loss_reference(pred, pred * 0, mask))


def test_each_forward_gets_its_own_zeroed_counter(seed, poison):
    """The ticket counter is allocated zeroed per forward, never shared: two launches built before either
    runs (as a CUDA graph holds one while other launches run) both give the float64-checked loss, in
    either order, and a large launch between two small ones leaves the small one's result bitwise equal."""
    from asit_kernels.masked_l1 import masked_l1_forward_launches

    small = _inputs((2, 1, 9, 7), (2, 1, 9, 7), torch.float32, "cpu")
    big = _inputs((2, 3, 70, 61), (2, 1, 70, 61), torch.float32, "cpu")
    (loss_s, den_s, _), [launch_s] = masked_l1_forward_launches(small[0].detach(), *small[1:])
    (loss_b, den_b, _), [launch_b] = masked_l1_forward_launches(big[0].detach(), *big[1:])
    assert launch_b.grid[0] > launch_s.grid[0], (launch_b.grid, launch_s.grid)  # several programs take tickets
    counter_s, counter_b = (next(a for a in launch.args if isinstance(a, torch.Tensor) and a.dtype == torch.int32)
                            for launch in (launch_s, launch_b))
    assert counter_s.data_ptr() != counter_b.data_ptr() and not counter_s.any() and not counter_b.any()
    launch_b()
    launch_s()
    first = loss_s.clone()
    for (pred, target, mask), loss, den in ((small, loss_s, den_s), (big, loss_b, den_b)):
        torch.testing.assert_close(loss.double(), masked_l1_loss_reference(pred.double(), target.double(), mask),
                                   rtol=1e-5, atol=1e-6, msg=lambda m: f"seed={seed}: {m}")
        assert den.item() == mask.expand(pred.shape).sum().item()
    (again, _, _), [launch] = masked_l1_forward_launches(small[0].detach(), *small[1:])
    launch()
    assert torch.equal(again, first), f"seed={seed}"
