"""Masked L1: mean absolute error over the masked (corrupted) pixels only."""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor, resolve_backend

__all__ = ["masked_l1_loss", "masked_l1_loss_reference"]

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def masked_l1_loss_reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(|pred - target| · mask) / max(sum(mask), 1)``, each input converted from its own dtype and
    accumulated in fp32 (fp64 when pred or target is fp64)."""
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    m = mask.to(acc).expand(pred.shape)
    num = ((pred.to(acc) - target.to(acc)).abs() * m).sum()
    return num / m.sum().clamp_min(1.0)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                   backend: str | None = None, deterministic: bool = False) -> torch.Tensor:
    """Masked L1 loss, a scalar in fp32 (fp64 for fp64 inputs).

    Args:
        pred: ``[B, C, H, W]`` (any shape) reconstruction, fp32/bf16/fp16/fp64; gets gradients.
        target: same shape as ``pred``, any of the same dtypes (an fp32 target with a bf16 prediction
            is read as fp32, never rounded to bf16 first).
        mask: broadcastable to ``pred`` (e.g. ``[B, 1, H, W]``); bool or float weights
            (True / 1 = corrupted pixel). The denominator is the mask's sum over the broadcast
            shape, clamped to at least 1, so an empty mask gives 0, not NaN.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``/None (CUDA → Triton); an fp64 pred or
            target always uses the reference.
        deterministic: accepted for compatibility; the Triton kernel always reduces in a fixed order,
            so its loss is run-to-run identical either way.

    The Triton path reads the inputs once in one launch (loss, mask sum and, when pred or target
    requires grad, the unscaled gradient), and the backward is one in-place scaling launch.
    """
    check_tensor("pred", pred, dtypes=_IN_DTYPES)
    check_tensor("target", target, dtypes=_IN_DTYPES)
    check_tensor("mask", mask, dtypes=_MASK_DTYPES)
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    try:
        # (torch.broadcast_shapes is a slow reference implementation: only when the shapes differ)
        fits = mask.shape == pred.shape or torch.broadcast_shapes(mask.shape, pred.shape) == pred.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to pred shape {tuple(pred.shape)}")
    check_same_device(pred=pred, target=target, mask=mask)
    # the kernel accumulates in fp32, so fp64 inputs keep their precision on the reference
    if resolve_backend(backend, pred.device) == "triton" and torch.float64 not in (pred.dtype, target.dtype):
        from . import _triton

        return _triton.masked_l1_loss_triton(pred, target, mask)
    return masked_l1_loss_reference(pred, target, mask)
