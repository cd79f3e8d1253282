"""Types the ops share with their Triton path: the GMML inputs and outputs, the distillation output,
and the row reduction that turns per-row distillation losses into :class:`DistillCEOutput.loss`.

This module imports nothing but ``torch``, so both an op file and ``_triton.py`` can import it
without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DistillCEOutput", "GMMLBlocks", "GMMLOutput", "reduce_rows"]


class GMMLBlocks(NamedTuple):
    """Sampled corruption for a batch.

    boxes:  int32 ``[B, M, 4]`` rows ``(top, left, height, width)``; unused slots have height 0.
    alien:  bool ``[B]``, True = fill from ``source``, False = fill with zeros.
    source: int64 ``[B]``, the batch index whose pixels fill an alien sample (ignored otherwise).
    target: float32 ``[B]``, the coverage fraction each sample was drawn for.
    """

    boxes: torch.Tensor
    alien: torch.Tensor
    source: torch.Tensor
    target: torch.Tensor


class GMMLOutput(NamedTuple):
    """corrupted ``[B, C, H, W]`` (input dtype), mask bool ``[B, 1, H, W]`` (True = corrupted),
    token_fraction float32 ``[B, (H // p) * (W // p)]`` (row-major token order, like patch_embed)."""

    corrupted: torch.Tensor
    mask: torch.Tensor
    token_fraction: torch.Tensor


class DistillCEOutput(NamedTuple):
    """loss: scalar (``reduction="mean"``) or per-row ``[N]`` (``"none"``), fp32 (fp64 for fp64).
    teacher_sum: ``[K]`` fp32 column sums of the raw teacher logits (no gradient)."""

    loss: torch.Tensor
    teacher_sum: torch.Tensor


def reduce_rows(rows: torch.Tensor, weights: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-row losses ``[N]`` to :attr:`DistillCEOutput.loss`: the (weighted) mean, or the rows times
    their weights for ``"none"``. An all-zero weight vector gives 0, not NaN."""
    if reduction == "none":
        return rows if weights is None else rows * weights.to(rows.dtype)
    if weights is None:
        return rows.mean()
    w = weights.to(rows.dtype)
    return (rows * w).sum() / w.sum().clamp_min(torch.finfo(rows.dtype).tiny)
