"""Triton path of the fused ops: ``torch.library`` custom ops around the ``asit_kernels`` launchers.

The ops are registered with ``torch.library.custom_op`` + ``register_fake`` (+ ``register_autograd``)
rather than ``triton_op``/``wrap_triton``: that form also runs under ``TRITON_INTERPRET=1`` on CPU
tensors, passes ``torch.library.opcheck`` and compiles with ``fullgraph=True`` (Inductor treats
each op as opaque).

The public op in each ``asit/ops/<op>.py`` validates its arguments and settles the backend before it
calls a wrapper here, so the wrappers never fall back to a reference: they receive only inputs the
kernels take. The kernels accumulate in fp32, so the ops send fp64 inputs to their references; GMML
only moves bits and takes every float dtype. This module imports ``_types`` and ``asit_kernels``,
never an op file.
"""

from __future__ import annotations

import torch
from asit_kernels import (
    distill_ce_backward,
    distill_ce_forward,
    first_cover_dtype,
    gmml_forward,
    gmml_prefix,
    masked_l1_backward,
    masked_l1_forward,
)

from ._types import DistillCEOutput, GMMLBlocks, GMMLOutput, reduce_rows

__all__ = ["centered_softmax_cross_entropy_triton", "gmml_corrupt_triton", "gmml_prefix_triton",
           "masked_l1_loss_triton"]


# ---------------------------------------------------------------- GMML (forward only)

@torch.library.custom_op("asit::gmml_corrupt", mutates_args=())
def _gmml_corrupt_op(x: torch.Tensor, boxes: torch.Tensor, alien: torch.Tensor, source: torch.Tensor,
                     patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return gmml_forward(x, boxes, alien, source, patch_size)


@_gmml_corrupt_op.register_fake
def _(x, boxes, alien, source, patch_size):
    b, _, h, w = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format),
            x.new_empty((b, 1, h, w), dtype=torch.bool),
            x.new_empty((b, (h // patch_size) * (w // patch_size)), dtype=torch.float32))


def gmml_corrupt_triton(x: torch.Tensor, blocks: GMMLBlocks, patch_size: int = 16) -> GMMLOutput:
    """Fused GMML painter; bit-identical to :func:`asit.ops.gmml_corrupt_reference`.

    Forward only: ``x`` is detached (the corrupted view is an input, not differentiated through).
    """
    return GMMLOutput(*_gmml_corrupt_op(x.detach(), blocks.boxes, blocks.alien, blocks.source, patch_size))


# ---------------------------------------------------------------- GMML sampling (shortest covering prefix)

@torch.library.custom_op("asit::gmml_prefix", mutates_args=())
def _gmml_prefix_op(boxes: torch.Tensor, need: torch.Tensor, height: int, width: int,
                    store_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return gmml_prefix(boxes, need, height, width, store_first)


@_gmml_prefix_op.register_fake
def _(boxes, need, height, width, store_first):
    b, m, _ = boxes.shape
    return (boxes.new_empty((b,), dtype=torch.int64),
            boxes.new_empty((b, height, width) if store_first else (0,), dtype=first_cover_dtype(m)))


def gmml_prefix_triton(boxes: torch.Tensor, need: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per sample, the smallest ``k`` whose first ``k`` boxes cover ``need`` pixels: int64 ``[B]`` in
    ``[1, M + 1]``, ``M + 1`` where all ``M`` fall short (the sampler's search reports ``M`` there)."""
    return _gmml_prefix_op(boxes, need, height, width, False)[0]


# ---------------------------------------------------------------- masked L1

@torch.library.custom_op("asit::masked_l1", mutates_args=())
def _masked_l1_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return masked_l1_forward(pred, target, mask, need_grad)


@_masked_l1_op.register_fake
def _(pred, target, mask, need_grad):
    return (pred.new_empty((), dtype=torch.float32), pred.new_empty((), dtype=torch.float32),
            torch.empty(pred.shape if need_grad else (0,), dtype=pred.dtype, device=pred.device))


@torch.library.custom_op("asit::masked_l1_backward", mutates_args=("grad",))
def _masked_l1_backward_op(grad: torch.Tensor, grad_out: torch.Tensor, den: torch.Tensor) -> None:
    masked_l1_backward(grad, grad_out, den)


@_masked_l1_backward_op.register_fake
def _(grad, grad_out, den):
    return None


def _masked_l1_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2])
    ctx.target_dtype, ctx.need_grad = inputs[1].dtype, inputs[3]


def _masked_l1_grad(ctx, grad_loss, grad_den, grad_grad):
    den, grad = ctx.saved_tensors  # a second backward through the same graph stops here (see _scale_saved)
    grad_pred = grad_target = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        if not ctx.need_grad:
            _no_stored_grad("asit::masked_l1")
        grad_pred = _scale_saved(_masked_l1_backward_op, grad, grad_loss, den)
        if ctx.needs_input_grad[1]:
            grad_target = (-grad_pred).to(ctx.target_dtype)
        if not ctx.needs_input_grad[0]:
            grad_pred = None
    # The mask is a constant (no gradient even if it is a float tensor that requires one).
    return grad_pred, grad_target, None, None


_masked_l1_op.register_autograd(_masked_l1_grad, setup_context=_masked_l1_setup)


def masked_l1_loss_triton(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Fused masked L1 (0-d fp32) for fp32/bf16/fp16 pred and target (dtypes may differ); the reduction
    is in a fixed order, so the loss is run-to-run identical. When pred or target requires grad, the
    forward also writes the unscaled gradient, which the backward scales in place."""
    need_grad = torch.is_grad_enabled() and (pred.requires_grad or target.requires_grad)
    loss, _, _ = _masked_l1_op(pred, target, mask, need_grad)
    return loss


# ---------------------------------------------------------------- in-place backward


def _no_stored_grad(name: str):
    raise RuntimeError(f"{name} was run without need_grad; no stored gradient to scale")


def _scale_saved(op, grad: torch.Tensor, *scale_args: torch.Tensor) -> torch.Tensor:
    """Scale the gradient the forward saved, in place, and return it as the input's gradient.

    In place, so the backward allocates no second buffer the size of the gradient. The op declares
    the mutation (``mutates_args``): eagerly that bumps the saved tensor's version, so a second
    backward through the same graph (``retain_graph=True``) stops at ``ctx.saved_tensors`` with
    autograd's "modified by an inplace operation" error instead of scaling the gradient twice;
    under ``torch.compile`` the mutation is functionalised. Double backward is not supported
    (the gradient has no graph of its own).
    """
    op(grad, *scale_args)
    return grad


# ---------------------------------------------------------------- centred softmax cross-entropy

@torch.library.custom_op("asit::distill_ce", mutates_args=())
def _distill_ce_op(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                   student_temp: torch.Tensor, teacher_temp: torch.Tensor,
                   need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return distill_ce_forward(student, teacher, center, student_temp, teacher_temp, need_grad)


@_distill_ce_op.register_fake
def _(student, teacher, center, student_temp, teacher_temp, need_grad):
    n, k = student.shape
    return (student.new_empty((n,), dtype=torch.float32), student.new_empty((k,), dtype=torch.float32),
            student.new_empty((n, k) if need_grad else (0,)))


@torch.library.custom_op("asit::distill_ce_backward", mutates_args=("grad",))
def _distill_ce_backward_op(grad: torch.Tensor, grad_rows: torch.Tensor) -> None:
    distill_ce_backward(grad, grad_rows)


@_distill_ce_backward_op.register_fake
def _(grad, grad_rows):
    return None


def _distill_ce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _distill_ce_grad(ctx, grad_rows, grad_teacher_sum, grad_grad):
    (grad,) = ctx.saved_tensors
    grad_student = None
    if ctx.needs_input_grad[0]:
        if grad.numel() != grad_rows.numel() * grad.shape[-1] or grad.dim() != 2:
            _no_stored_grad("asit::distill_ce")
        grad_student = _scale_saved(_distill_ce_backward_op, grad, grad_rows)
    return grad_student, None, None, None, None, None


_distill_ce_op.register_autograd(_distill_ce_grad, setup_context=_distill_ce_setup)


def _as_temp(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Temperature as a one-element tensor on ``like``'s device (no host sync, no recompiles)."""
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(device=like.device)
    return torch.full((), float(value), dtype=torch.float32, device=like.device)


def centered_softmax_cross_entropy_triton(
    student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
    student_temp: float | torch.Tensor, teacher_temp: float | torch.Tensor,
    weights: torch.Tensor | None = None, reduction: str = "mean",
) -> DistillCEOutput:
    """Fused centred softmax cross-entropy for fp32/bf16/fp16 logits; same contract as the reference.

    The kernel returns per-row losses, the teacher column sums and the student gradient
    ``(q - p)/τs``; the weighting and the mean over rows are PyTorch on the ``[N]`` vector, so
    the backward is one pass that scales the stored gradient, in place, by the upstream per-row gradient.
    """
    need_grad = torch.is_grad_enabled() and student.requires_grad
    rows, teacher_sum, _ = _distill_ce_op(student, teacher.detach(), center.detach().reshape(-1),
                                          _as_temp(student_temp, student), _as_temp(teacher_temp, student),
                                          need_grad)
    return DistillCEOutput(reduce_rows(rows, weights, reduction), teacher_sum.detach())
