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
from asit_kernels._utils import new_output

from ._types import DistillCEOutput, GMMLBlocks, GMMLOutput, reduce_rows

__all__ = ["centered_softmax_cross_entropy_triton", "gmml_corrupt_triton", "gmml_prefix_triton",
           "linear_centered_softmax_cross_entropy_triton", "masked_l1_loss_triton"]


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


# ---------------------------------------------------------------- output layer + centred softmax cross-entropy
#
# Rows are processed in chunks of ``chunk_rows``: per chunk the student and teacher logits are one cuBLAS
# matmul each (in ``compute_dtype``), the CE kernel above writes the per-row losses, the chunk's teacher column
# sums and the logit gradient G = (q - p)/τs, and G is multiplied straight into dh = G·W and dW += Gᵀ·h. Both
# products take compute-dtype operands and give an fp32 result accumulated in fp32 (``_mm_f32``), so dW is a
# sum of unrounded chunk products. The mean's per-row factor s_i = w_i/Σw (1/N without weights) enters dh in
# fp32 before its one rounding to h_s's dtype; for dW the chunk's G rows are scaled by w_i (in place, one
# rounding in the compute dtype; none without weights) and the constant 1/Σw (or 1/N) is applied once to the
# fp32 dW at the end. The forward so leaves dh and dW scaled for an upstream gradient of 1 and the backward
# only multiplies both by the upstream scalar, in place. Nothing of size N x K outlives a chunk.

# torch.mm(a, b, out_dtype=torch.float32): bf16/fp16 operands, fp32 result, on CUDA (aten::mm.dtype).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as fp32, accumulated in fp32 and never rounded to a narrower dtype.

    bf16/fp16 operands on CUDA use cuBLAS's fp32 output (``out_dtype``); elsewhere (CPU, or a torch
    without it) the operands are upcast and multiplied in fp32.
    """
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return torch.mm(a, b)
    if _MM_OUT_DTYPE and a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _row_scale(weights: torch.Tensor | None, n: int,
               device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(w, 1/Σw)`` with ``s_i = w_i/Σw`` making Σ s_i l_i equal :func:`reduce_rows` (``"mean"``).

    ``w`` is the fp32 row weights (None without them); the second item is ``1/max(Σw, tiny)``, or 1/N, 0-d fp32.
    """
    if weights is None:
        return None, torch.full((), 1.0 / max(n, 1), dtype=torch.float32, device=device)
    w = weights.to(torch.float32)
    return w, 1.0 / w.sum().clamp_min(torch.finfo(torch.float32).tiny)


@torch.library.custom_op("asit::linear_distill_ce", mutates_args=())
def _linear_distill_ce_op(h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, teacher_weight: torch.Tensor,
                          center: torch.Tensor, student_temp: torch.Tensor, teacher_temp: torch.Tensor,
                          weights: torch.Tensor | None, compute_dtype: torch.dtype, chunk_rows: int,
                          grad_h: bool, grad_w: bool,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(row_loss [N] fp32, mean loss [] fp32, teacher_sum [K] fp32, dh [N, D] h_s dtype, dW [K, D] fp32)``;
    dh / dW are empty unless ``grad_h`` / ``grad_w``, and are the gradients of the mean loss."""
    n, d = h_s.shape
    k = weight.shape[0]
    dev = h_s.device
    need_grad = grad_h or grad_w
    rows = new_output((n,), torch.float32, dev)
    teacher_sum = torch.zeros(k, dtype=torch.float32, device=dev)
    dh = new_output((n, d) if grad_h else (0,), h_s.dtype, dev)
    dw = torch.zeros((k, d) if grad_w else (0,), dtype=torch.float32, device=dev)
    with torch.autocast(dev.type, enabled=False):  # the operands arrive in compute_dtype: no casts inside
        w_s = weight.to(compute_dtype)
        w_t = teacher_weight.to(compute_dtype)
        w_rows, inv_total = _row_scale(weights, n, dev) if need_grad else (None, None)
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            hs = h_s[r0:r1].to(compute_dtype)
            logits_s = torch.mm(hs, w_s.t())
            logits_t = torch.mm(h_t[r0:r1].to(compute_dtype), w_t.t())
            row_loss, chunk_sum, grad = distill_ce_forward(logits_s, logits_t, center, student_temp, teacher_temp,
                                                           need_grad)
            del logits_s, logits_t
            rows[r0:r1] = row_loss
            teacher_sum += chunk_sum  # fixed chunk order: deterministic
            if need_grad:
                if grad_h:
                    s = inv_total if w_rows is None else w_rows[r0:r1, None] * inv_total
                    dh[r0:r1] = _mm_f32(grad, w_s) * s
                if grad_w:
                    if w_rows is not None:
                        grad.mul_(w_rows[r0:r1, None])  # computed in fp32, rounded once to G's dtype
                    dw += _mm_f32(grad.t(), hs)
            del grad  # at most three [chunk, K] tiles live at once: the next chunk's logits and gradient
        if grad_w:
            dw *= inv_total  # the mean's 1/Σw (or 1/N), once, in fp32
    return rows, reduce_rows(rows, weights, "mean"), teacher_sum, dh, dw


@_linear_distill_ce_op.register_fake
def _(h_s, h_t, weight, teacher_weight, center, student_temp, teacher_temp, weights, compute_dtype, chunk_rows,
      grad_h, grad_w):
    n, d = h_s.shape
    k = weight.shape[0]
    f32 = torch.float32
    return (h_s.new_empty((n,), dtype=f32), h_s.new_empty((), dtype=f32), h_s.new_empty((k,), dtype=f32),
            h_s.new_empty((n, d) if grad_h else (0,)), h_s.new_empty((k, d) if grad_w else (0,), dtype=f32))


@torch.library.custom_op("asit::linear_distill_ce_backward", mutates_args=("grad_h", "grad_w"))
def _linear_distill_ce_backward_op(grad_h: torch.Tensor, grad_w: torch.Tensor, grad_loss: torch.Tensor) -> None:
    g = grad_loss.to(torch.float32)
    grad_h.mul_(g)
    grad_w.mul_(g)


@_linear_distill_ce_backward_op.register_fake
def _(grad_h, grad_w, grad_loss):
    return None


def _linear_distill_ce_setup(ctx, inputs, output):
    ctx.save_for_backward(output[3], output[4])
    ctx.weight_dtype = inputs[2].dtype
    ctx.stored = (inputs[10], inputs[11])


def _linear_distill_ce_grad(ctx, grad_rows, grad_loss, grad_teacher_sum, grad_dh, grad_dw):
    # Only the mean loss carries a gradient: the public op refuses a gradient through the per-row losses.
    dh, dw = ctx.saved_tensors  # a second backward through the same graph stops here (see _scale_saved)
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if (need_h and not ctx.stored[0]) or (need_w and not ctx.stored[1]):
        _no_stored_grad("asit::linear_distill_ce")
    grad_h = grad_w = None
    if need_h or need_w:
        dh = _scale_saved(_linear_distill_ce_backward_op, dh, dw, grad_loss)  # dw is scaled in place beside dh
        grad_h = dh if need_h else None
        grad_w = dw.to(ctx.weight_dtype) if need_w else None
    return grad_h, None, grad_w, *([None] * 9)


_linear_distill_ce_op.register_autograd(_linear_distill_ce_grad, setup_context=_linear_distill_ce_setup)


def linear_centered_softmax_cross_entropy_triton(
    h_s: torch.Tensor, h_t: torch.Tensor, weight: torch.Tensor, teacher_weight: torch.Tensor, center: torch.Tensor,
    student_temp: float | torch.Tensor, teacher_temp: float | torch.Tensor, weights: torch.Tensor | None,
    reduction: str, compute_dtype: torch.dtype, chunk_rows: int,
) -> DistillCEOutput:
    """Chunked ``h_s·Wᵀ`` / ``h_t·W_tᵀ`` + fused CE; same contract as the reference, logits never whole.

    ``reduction="none"`` is forward only (the caller has checked that no gradient is wanted).
    """
    need = torch.is_grad_enabled() and reduction == "mean"
    grad_h = need and h_s.requires_grad
    grad_w = need and weight.requires_grad
    rows, loss, teacher_sum, _, _ = _linear_distill_ce_op(
        h_s, h_t.detach(), weight, teacher_weight.detach(), center.detach().reshape(-1),
        _as_temp(student_temp, h_s), _as_temp(teacher_temp, h_s),
        None if weights is None else weights.detach(), compute_dtype, chunk_rows, grad_h, grad_w)
    if reduction == "none":
        return DistillCEOutput(reduce_rows(rows, weights, "none").detach(), teacher_sum.detach())
    return DistillCEOutput(loss, teacher_sum.detach())
