"""Masked L1 loss: ``sum(|pred - target| · mask) / max(sum(mask), 1)``.

Forward: one pass over pred/target/mask writing one (num, den) partial per program, then a
one-program finalise that sums the partials in a fixed order (``deterministic=True``) or reads
a pair of fp32 accumulators filled with atomics (``deterministic=False``, run-to-run order may
differ in the last bits). Backward: one elementwise pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, elementwise_blocks, new_output, pow2_block, run_launches


# Per program q over its span S_q of the flat arrays:
#   num_q = Σ_{i∈S_q} |p_i - t_i| · m_i,   den_q = Σ_{i∈S_q} m_i
@triton.jit
def _masked_l1_partial_kernel(
    pred_ptr,  # [n] pred, fp32/bf16/fp16, contiguous
    target_ptr,  # [n] target, same dtype as pred
    mask_ptr,  # [n] mask already broadcast to pred's shape (uint8 view of bool, or float)
    part_ptr,  # [programs, 2] fp32 partials (num, den); written when DETERMINISTIC
    acc_ptr,  # [2] fp32 zero-initialised accumulators; atomically added to otherwise
    n_elements,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    start = pid * (BLOCK * TILES)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, TILES):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_elements
        p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
        num += tl.abs(p - t) * m
        den += m
    num_sum = tl.sum(num, axis=0)
    den_sum = tl.sum(den, axis=0)
    two = tl.arange(0, 2)
    pair = tl.where(two == 0, num_sum, den_sum)
    if DETERMINISTIC:
        tl.store(part_ptr + pid * 2 + two, pair, mask=two < 2)
    else:
        tl.atomic_add(acc_ptr + two, pair, mask=two < 2)


# loss = (Σ_q num_q) / max(Σ_q den_q, 1); also writes den = Σ_q den_q for the backward.
@triton.jit
def _masked_l1_finalize_kernel(
    part_ptr,  # [n_parts, 2] fp32 partials (read when DETERMINISTIC)
    acc_ptr,  # [2] fp32 atomic accumulators (read otherwise)
    loss_ptr,  # [1] fp32 output loss
    den_ptr,  # [1] fp32 output mask sum (unclamped)
    n_parts,
    BLOCK: tl.constexpr,
    DETERMINISTIC: tl.constexpr,
):
    two = tl.arange(0, 2)
    if DETERMINISTIC:
        num = tl.zeros([BLOCK], dtype=tl.float32)
        den = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_parts, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n_parts
            num += tl.load(part_ptr + offs * 2, mask=valid, other=0.0)
            den += tl.load(part_ptr + offs * 2 + 1, mask=valid, other=0.0)
        num_sum = tl.sum(num, axis=0)
        den_sum = tl.sum(den, axis=0)
    else:
        pair = tl.load(acc_ptr + two, mask=two < 2, other=0.0)
        num_sum = tl.sum(tl.where(two == 0, pair, 0.0), axis=0)
        den_sum = tl.sum(tl.where(two == 1, pair, 0.0), axis=0)
    out = tl.where(two == 0, num_sum / tl.maximum(den_sum, 1.0), den_sum)
    tl.store(loss_ptr + two, out, mask=two == 0)
    tl.store(den_ptr + two - 1, out, mask=two == 1)


# grad_p_i = sign(p_i - t_i) · m_i · g / max(den, 1)   (sign(0) = 0, like autograd's abs)
@triton.jit
def _masked_l1_backward_kernel(
    pred_ptr,  # [n] pred
    target_ptr,  # [n] target
    mask_ptr,  # [n] broadcast mask
    grad_out_ptr,  # [1] fp32 upstream gradient of the scalar loss
    den_ptr,  # [1] fp32 mask sum from the forward
    grad_pred_ptr,  # [n] output, pred's dtype
    n_elements,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    zero = tl.arange(0, 1)
    g = tl.sum(tl.load(grad_out_ptr + zero, mask=zero < 1, other=0.0).to(tl.float32), axis=0)
    den = tl.sum(tl.load(den_ptr + zero, mask=zero < 1, other=0.0), axis=0)
    scale = g / tl.maximum(den, 1.0)
    start = pid * (BLOCK * TILES)
    for i in range(0, TILES):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_elements
        p = tl.load(pred_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + offs, mask=valid, other=0).to(tl.float32)
        d = p - t
        sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
        grad = sign * m * scale
        tl.store(grad_pred_ptr + offs, grad.to(grad_pred_ptr.dtype.element_ty), mask=valid)


def _flat_inputs(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Contiguous flat views; the mask is broadcast to pred's shape (bool read as uint8)."""
    p = pred.contiguous().reshape(-1)
    t = target.contiguous().reshape(-1)
    m = mask.expand(pred.shape).contiguous().reshape(-1)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return p, t, m


def masked_l1_forward_launches(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                               deterministic: bool = False,
                               ) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(loss, den)`` of :func:`masked_l1_forward` and the launches that fill them."""
    p, t, m = _flat_inputs(pred, target, mask)
    n = p.numel()
    block, tiles, programs, warps = elementwise_blocks(n)
    dev = pred.device
    part = new_output((programs, 2) if deterministic else (1, 2), torch.float32, dev)
    acc = torch.zeros(2 if not deterministic else 1, dtype=torch.float32, device=dev)
    loss = new_output((), torch.float32, dev)
    den = new_output((), torch.float32, dev)
    launches = [
        Launch(_masked_l1_partial_kernel, (programs,), (p, t, m, part, acc, n),
               dict(BLOCK=block, TILES=tiles, DETERMINISTIC=deterministic, num_warps=warps)),
        Launch(_masked_l1_finalize_kernel, (1,), (part, acc, loss, den, programs),
               dict(BLOCK=pow2_block(programs, max_block=1024), DETERMINISTIC=deterministic)),
    ]
    return (loss, den), launches


def masked_l1_forward(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(loss, den)``: 0-d fp32 loss and the 0-d fp32 mask sum (needed by the backward)."""
    outputs, launches = masked_l1_forward_launches(pred, target, mask, deterministic)
    run_launches(launches)
    return outputs


def masked_l1_backward_launches(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                                grad_out: torch.Tensor, den: torch.Tensor) -> tuple[torch.Tensor, list[Launch]]:
    """Output of :func:`masked_l1_backward` and the launch that fills it."""
    p, t, m = _flat_inputs(pred, target, mask)
    n = p.numel()
    block, tiles, programs, warps = elementwise_blocks(n)
    grad = new_output(pred.shape, pred.dtype, pred.device)
    g = grad_out.reshape(1).to(torch.float32)
    return grad, [Launch(_masked_l1_backward_kernel, (programs,), (p, t, m, g, den.reshape(1), grad, n),
                         dict(BLOCK=block, TILES=tiles, num_warps=warps))]


def masked_l1_backward(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                       grad_out: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``grad_pred`` (pred's dtype and shape, contiguous) for upstream gradient ``grad_out`` (0-d)."""
    grad, launches = masked_l1_backward_launches(pred, target, mask, grad_out, den)
    run_launches(launches)
    return grad
