"""The projection head's output layer fused with the centred softmax cross-entropy.

``linear_centered_softmax_cross_entropy(h_s, h_t, W, c, τ_s, τ_t)`` is exactly
``centered_softmax_cross_entropy(h_s · Wᵀ, h_t · W_tᵀ, c, τ_s, τ_t)``: the student's bottleneck features
``h_s [N, D]`` and the output weight ``W [K, D]`` receive the gradient; the teacher's features and weight
(``W_t``, by default ``W``) never do. The fused path never holds the ``N x K`` logits: it walks the rows in
chunks, makes each chunk's logits with one matmul per side, runs the fused CE kernel on them and multiplies
the logit gradient straight into ``dh_s`` and ``dW``: fp32 products of the logit-dtype operands, ``dW`` summed
over the chunks in fp32 in a fixed order (two runs are bitwise equal), each rounded once to its output dtype.
The teacher column sums for the centre are the kernel's per-chunk sums of the teacher logits as they were
computed, added in chunk order: the same numbers the unfused op would sum, not ``(Σ h_t)·W_tᵀ`` (which is
cheaper but, in bf16, a differently rounded quantity than the logits the loss saw).

The logits are computed in one dtype for both sides: the autocast dtype when autocast is on for the inputs'
device (and no input is fp64), else the promoted dtype of ``h_s``, ``W``, ``h_t`` and ``W_t``. fp64 goes to
the reference (the kernel accumulates in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import check_positive_finite, check_row_options, check_same_device, check_tensor, resolve_backend
from ._types import DistillCEOutput
from .distill_ce import centered_softmax_cross_entropy_reference

__all__ = ["linear_centered_softmax_cross_entropy", "linear_centered_softmax_cross_entropy_reference"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# A chunk's [rows, K] logit tile stays at or under this many bytes (and 4,096 rows at most).
CHUNK_BYTES = 32 * 2**20
MAX_CHUNK_ROWS = 4096


@torch.compiler.assume_constant_result  # torch 2.11's Dynamo cannot trace is_autocast_available; 2.14's can
def _autocast_available(device_type: str) -> bool:
    return torch.amp.is_autocast_available(device_type)


def logits_dtype(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor,
                 teacher_weight: torch.Tensor) -> torch.dtype:
    """The dtype both logit tiles are computed in (see the module docstring)."""
    tensors = (h_s, h_t, weight, teacher_weight)
    device_type = h_s.device.type
    if (_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
            and all(t.dtype != torch.float64 for t in tensors)):
        return torch.get_autocast_dtype(device_type)
    dtype = h_s.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def default_chunk_rows(k: int, dtype: torch.dtype) -> int:
    """Rows per chunk: ``MAX_CHUNK_ROWS``, fewer when a ``[rows, K]`` tile would pass ``CHUNK_BYTES``."""
    return max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // max(k * dtype.itemsize, 1)))


def linear_centered_softmax_cross_entropy_reference(
    h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, center: torch.Tensor,
    student_temp: float | torch.Tensor, teacher_temp: float | torch.Tensor,
    weights: torch.Tensor | None = None, *, teacher_weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> DistillCEOutput:
    """Pure-PyTorch twin: the full logits, then :func:`centered_softmax_cross_entropy_reference`."""
    teacher_weight = weight if teacher_weight is None else teacher_weight
    dtype = logits_dtype(h_s, h_t, weight, teacher_weight)
    student = F.linear(h_s.to(dtype), weight.to(dtype))
    teacher = F.linear(h_t.detach().to(dtype), teacher_weight.detach().to(dtype))
    return centered_softmax_cross_entropy_reference(student, teacher, center, student_temp, teacher_temp,
                                                    weights, reduction)


def _check(h_s, h_t, weight, teacher_weight, center, student_temp, teacher_temp, weights, reduction,
           chunk_rows) -> None:
    check_tensor("h_s", h_s, ndim=2, dtypes=_DTYPES)
    check_tensor("h_t", h_t, ndim=2, dtypes=_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=_DTYPES)
    if h_t.shape != h_s.shape:
        raise ValueError(f"h_t shape {tuple(h_t.shape)} must equal h_s shape {tuple(h_s.shape)}")
    if weight.shape[1] != h_s.shape[1]:
        raise ValueError(f"weight must be [K, D] with D = {h_s.shape[1]} (h_s's feature size), "
                         f"got shape {tuple(weight.shape)}")
    if teacher_weight is not None:
        check_tensor("teacher_weight", teacher_weight, ndim=2, dtypes=_DTYPES)
        if teacher_weight.shape != weight.shape:
            raise ValueError(f"teacher_weight shape {tuple(teacher_weight.shape)} must equal weight shape "
                             f"{tuple(weight.shape)}")
    check_tensor("center", center, ndim=(1, 2), dtypes=(torch.float32, torch.float64))
    if center.numel() != weight.shape[0]:
        raise ValueError(f"center must have {weight.shape[0]} entries (K, weight's rows), "
                         f"got shape {tuple(center.shape)}")
    check_positive_finite("student_temp", student_temp)
    check_positive_finite("teacher_temp", teacher_temp)
    # weights: floating, on h_s's device (below); non-negativity is documented, not checked
    check_row_options(weights, h_s.shape[0], reduction)
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    check_same_device(h_s=h_s, h_t=h_t, weight=weight, teacher_weight=teacher_weight, center=center,
                      weights=weights)


def linear_centered_softmax_cross_entropy(
    h_s: torch.Tensor,
    h_t: torch.Tensor,
    weight: torch.Tensor,
    center: torch.Tensor,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    teacher_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> DistillCEOutput:
    """Centred softmax cross-entropy of ``h_s·Wᵀ`` against ``h_t·W_tᵀ`` without materialising the logits.

    Args:
        h_s: ``[N, D]`` student features (the head's bottleneck output); receives the gradient.
        h_t: ``[N, D]`` teacher features; never receives a gradient.
        weight: ``[K, D]`` the student's output-layer weight (e.g. a weight-normalised layer's effective
            weight, so the gradient flows on into its ``g`` and ``v``); receives the gradient.
        center: ``[K]`` centre subtracted from the teacher logits (fp32).
        student_temp: ``τ_s``; Python float > 0 or a 0-d tensor.
        teacher_temp: ``τ_t``; Python float > 0 or a 0-d tensor.
        weights: optional ``[N]`` floating row weights on the inputs' device, non-negative (not checked: that
            would cost a host sync); the mean becomes ``Σ w_i l_i / Σ w_i`` (0 when all are 0).
        teacher_weight: ``[K, D]`` the teacher's output weight (default: ``weight``); never gets a gradient.
        reduction: ``"mean"`` (scalar, differentiable) or ``"none"`` (per-row losses times the weights;
            forward only: a gradient through it raises).
        chunk_rows: rows per chunk on the fused path (default: 4,096, fewer when a chunk's logits would pass
            32 MB); the reference ignores it.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``/None (CUDA → fused); fp64 always uses the reference.

    Returns:
        :class:`DistillCEOutput` ``(loss, teacher_sum [K])``, exactly as
        :func:`centered_softmax_cross_entropy` on the full logits.
    """
    _check(h_s, h_t, weight, teacher_weight, center, student_temp, teacher_temp, weights, reduction, chunk_rows)
    if reduction == "none" and torch.is_grad_enabled() and (h_s.requires_grad or weight.requires_grad):
        raise ValueError("reduction='none' is forward only: call it under torch.no_grad() or with h_s and weight "
                         "detached, or use reduction='mean' for a gradient")
    center = center.reshape(-1)
    tw = weight if teacher_weight is None else teacher_weight
    dtype = logits_dtype(h_s, h_t, weight, tw)
    if resolve_backend(backend, h_s.device) == "triton" and dtype != torch.float64:
        from . import _triton

        rows = chunk_rows if chunk_rows is not None else default_chunk_rows(weight.shape[0], dtype)
        return _triton.linear_centered_softmax_cross_entropy_triton(h_s, h_t, weight, tw, center, student_temp,
                                                                    teacher_temp, weights, reduction, dtype, rows)
    return linear_centered_softmax_cross_entropy_reference(h_s, h_t, weight, center, student_temp, teacher_temp,
                                                           weights, teacher_weight=tw, reduction=reduction)
