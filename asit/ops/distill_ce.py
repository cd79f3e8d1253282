"""Centred, sharpened softmax cross-entropy (the DINO/iBOT/ASiT self-distillation loss).

Per row ``i``: ``p = softmax((t_i - c) / τ_t)`` (teacher, no gradient) and
``loss_i = -Σ_k p_k · log_softmax(s_i / τ_s)_k``. Alongside the loss the op returns the column
sums of the raw teacher logits, which is what the centre EMA needs.
"""

from __future__ import annotations

import torch

from ._checks import check_positive_finite, check_row_options, check_same_device, check_tensor, resolve_backend
from ._types import DistillCEOutput, reduce_rows

__all__ = ["centered_softmax_cross_entropy", "centered_softmax_cross_entropy_reference"]

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def centered_softmax_cross_entropy_reference(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
    student_temp: float | torch.Tensor, teacher_temp: float | torch.Tensor,
    weights: torch.Tensor | None = None, reduction: str = "mean",
) -> DistillCEOutput:
    """Pure-PyTorch twin of the fused kernel (fp32 math; fp64 inputs stay fp64)."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    t = teacher.detach().to(acc)
    p = torch.softmax((t - center.detach().to(acc)) / teacher_temp, dim=-1)
    log_q = torch.log_softmax(student.to(acc) / student_temp, dim=-1)
    rows = -(p * log_q).sum(-1)
    return DistillCEOutput(reduce_rows(rows, weights, reduction), t.sum(0).float())


def centered_softmax_cross_entropy(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float | torch.Tensor,
    teacher_temp: float | torch.Tensor,
    weights: torch.Tensor | None = None,
    *,
    reduction: str = "mean",
    backend: str | None = None,
) -> DistillCEOutput:
    """Cross-entropy between a centred, sharpened teacher softmax and the student log-softmax.

    Args:
        student: ``[N, K]`` student logits (fp32/bf16/fp16/fp64); receives the gradient.
        teacher: ``[N, K]`` teacher logits, same dtype; never receives a gradient.
        center: ``[K]`` centre subtracted from the teacher logits (fp32).
        student_temp: ``τ_s`` (paper: 0.1); Python float > 0 or a 0-d tensor.
        teacher_temp: ``τ_t`` (0.04 → 0.07 warm-up); Python float > 0 or a 0-d tensor.
        weights: optional ``[N]`` row weights (e.g. the per-token corrupted fraction for the
            paper's Eq. 6); the mean becomes ``Σ w_i l_i / Σ w_i`` (0 when all weights are 0).
        reduction: ``"mean"`` (scalar) or ``"none"`` (per-row losses, times the weight if given).
        backend: ``"reference"``, ``"triton"`` or ``"auto"``/None (CUDA → Triton); fp64 logits
            always use the reference.

    Returns:
        :class:`DistillCEOutput` ``(loss, teacher_sum)``.
    """
    check_tensor("student", student, ndim=2, dtypes=_LOGIT_DTYPES)
    check_tensor("teacher", teacher, ndim=2, dtypes=_LOGIT_DTYPES)
    if teacher.shape != student.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} must equal student shape "
                         f"{tuple(student.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher dtype {teacher.dtype} must equal student dtype {student.dtype}")
    check_tensor("center", center, ndim=(1, 2), dtypes=(torch.float32, torch.float64))
    if center.numel() != student.shape[1]:
        raise ValueError(f"center must have {student.shape[1]} entries (K), got shape {tuple(center.shape)}")
    check_positive_finite("student_temp", student_temp)
    check_positive_finite("teacher_temp", teacher_temp)
    check_row_options(weights, student.shape[0], reduction)
    check_same_device(student=student, teacher=teacher, center=center, weights=weights)
    center = center.reshape(-1)
    # the kernel accumulates in fp32, so fp64 logits keep their precision on the reference
    if resolve_backend(backend, student.device) == "triton" and student.dtype != torch.float64:
        from . import _triton

        return _triton.centered_softmax_cross_entropy_triton(student, teacher, center, student_temp, teacher_temp,
                                                             weights, reduction)
    return centered_softmax_cross_entropy_reference(student, teacher, center, student_temp, teacher_temp,
                                                    weights, reduction)
