"""Masked L1: mean absolute error over the masked (corrupted) pixels only."""

from __future__ import annotations

import torch

from ._checks import check_same_device, check_tensor, resolve_backend

__all__ = ["masked_l1_loss", "masked_l1_loss_reference"]

_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_MASK_DTYPES = (torch.bool, torch.uint8, torch.float32, torch.float16, torch.bfloat16, torch.float64)


def masked_l1_loss_reference(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum(|pred - target| · mask) / max(sum(mask), 1)`` accumulated in fp32 (fp64 stays fp64)."""
    acc = torch.float64 if pred.dtype == torch.float64 else torch.float32
    m = mask.to(acc).expand(pred.shape)
    num = ((pred.to(acc) - target.to(acc)).abs() * m).sum()
    return num / m.sum().clamp_min(1.0)


def masked_l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *,
                   backend: str | None = None, deterministic: bool = False) -> torch.Tensor:
    """Masked L1 loss, a scalar in fp32 (fp64 for fp64 inputs).

    Args:
        pred: ``[B, C, H, W]`` (any shape) reconstruction, fp32/bf16/fp16/fp64; gets gradients.
        target: same shape and dtype as ``pred``; treated as a constant in the fused kernel.
        mask: broadcastable to ``pred`` (e.g. ``[B, 1, H, W]``); bool or float weights
            (True / 1 = corrupted pixel). The denominator is the mask's sum over the broadcast
            shape, clamped to at least 1, so an empty mask gives 0, not NaN.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``/None (CUDA → Triton); fp64 inputs
            always use the reference.
        deterministic: ask the Triton kernel for a run-to-run identical reduction.
    """
    check_tensor("pred", pred, dtypes=_IN_DTYPES)
    check_tensor("target", target, dtypes=_IN_DTYPES)
    check_tensor("mask", mask, dtypes=_MASK_DTYPES)
    if target.shape != pred.shape:
        raise ValueError(f"target shape {tuple(target.shape)} must equal pred shape {tuple(pred.shape)}")
    if target.dtype != pred.dtype:
        raise TypeError(f"target dtype {target.dtype} must equal pred dtype {pred.dtype}")
    try:
        # (torch.broadcast_shapes is a slow reference implementation: only when the shapes differ)
        fits = mask.shape == pred.shape or torch.broadcast_shapes(mask.shape, pred.shape) == pred.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not broadcast to pred shape {tuple(pred.shape)}")
    check_same_device(pred=pred, target=target, mask=mask)
    # the kernel accumulates in fp32, so fp64 inputs keep their precision on the reference
    if resolve_backend(backend, pred.device) == "triton" and pred.dtype != torch.float64:
        from . import _triton

        return _triton.masked_l1_loss_triton(pred, target, mask, deterministic=deterministic)
    return masked_l1_loss_reference(pred, target, mask)
