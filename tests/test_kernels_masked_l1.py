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


def test_deterministic_is_repeatable(device, seed):
    pred, target, mask = _inputs((2, 3, 40, 30), (2, 1, 40, 30), torch.float32, device)
    a = masked_l1_loss(pred.detach(), target, mask, backend="triton", deterministic=True)
    b = masked_l1_loss(pred.detach(), target, mask, backend="triton", deterministic=True)
    assert torch.equal(a, b)


def test_fp64_falls_back_to_reference(device):
    pred = torch.randn(2, 5, dtype=torch.float64, device=device)
    mask = torch.rand(2, 5, device=device) < 0.5
    out = masked_l1_loss(pred, pred * 0, mask, backend="triton")
    assert out.dtype == torch.float64
    assert torch.equal(out, masked_l1_loss_reference(pred, pred * 0, mask))
