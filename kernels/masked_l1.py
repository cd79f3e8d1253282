"""Masked L1 loss: ``sum(|pred - target| · mask) / max(sum(mask), 1)``, forward and backward in two launches.

Forward: one kernel. Each program reads its span of pred, target and the broadcast mask once (each in
its own dtype, converted to fp32 per load, so an fp32 target may meet a bf16 prediction), writes its
``(num, den)`` partial and, when a gradient is wanted, the unscaled gradient ``sign(p - t) · m`` in
pred's dtype. The last program to finish (an atomic ticket counter) sums the partials in program order
— so the loss is run-to-run identical — and writes the loss and the mask sum. Backward: one elementwise
kernel that scales the stored gradient in place by ``grad_out / max(den, 1)``.

The ticket counter is one int32 allocated zeroed with each forward (a 4-byte memset on the launching
stream, captured with the kernel into any CUDA graph), so no two launches, streams or graphs share it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, elementwise_blocks, load_scalar_f32, new_output, pow2_block, run_launches


# Per program q over its span S_q of the flat arrays:
#   num_q = Σ_{i∈S_q} |p_i - t_i| · m_i,   den_q = Σ_{i∈S_q} m_i,   G_i = sign(p_i - t_i) · m_i
# The last program: loss = (Σ_q num_q) / max(Σ_q den_q, 1), den = Σ_q den_q (q in order).
@triton.jit
def _masked_l1_kernel(
    pred_ptr,  # [n] pred, fp32/bf16/fp16, contiguous
    target_ptr,  # [n] target, fp32/bf16/fp16 (its own dtype), contiguous
    mask_ptr,  # [n] mask already broadcast to pred's shape (uint8 view of bool, or float)
    grad_ptr,  # [n] unscaled gradient G, pred's dtype (written when WRITE_GRAD)
    part_ptr,  # [programs, 2] fp32 partials (num, den)
    count_ptr,  # [1] int32 ticket counter, zero on entry (fresh per launch)
    loss_ptr,  # [1] fp32 output loss
    den_ptr,  # [1] fp32 output mask sum (unclamped)
    n_elements,
    n_programs,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
    FINAL_BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
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
        d = p - t
        num += tl.abs(d) * m
        den += m
        if WRITE_GRAD:
            sign = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))  # sign(0) = 0, like autograd's abs
            tl.store(grad_ptr + offs, (sign * m).to(grad_ptr.dtype.element_ty), mask=valid)
    two = tl.arange(0, 2)
    pair = tl.where(two == 0, tl.sum(num, axis=0), tl.sum(den, axis=0))
    # the stream-K pattern of Triton's own split reductions: write-through store, barrier, ticket; the
    # last program reads the partials from L2 (.cg skips the SM's L1; triton 3.6 drops .cv to a plain
    # ld.global, 3.8 emits both), after its acquiring ticket
    tl.store(part_ptr + pid * 2 + two, pair, mask=two < 2, cache_modifier=".wt")
    tl.debug_barrier()  # every thread's partial is stored before the (one-thread) ticket below releases it
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == n_programs - 1:
        num_acc = tl.zeros([FINAL_BLOCK], dtype=tl.float32)
        den_acc = tl.zeros([FINAL_BLOCK], dtype=tl.float32)
        for s in range(0, n_programs, FINAL_BLOCK):
            idx = s + tl.arange(0, FINAL_BLOCK)
            ok = idx < n_programs
            num_acc += tl.load(part_ptr + idx * 2, mask=ok, other=0.0, cache_modifier=".cg")
            den_acc += tl.load(part_ptr + idx * 2 + 1, mask=ok, other=0.0, cache_modifier=".cg")
        num_sum = tl.sum(num_acc, axis=0)
        den_sum = tl.sum(den_acc, axis=0)
        out = tl.where(two == 0, num_sum / tl.maximum(den_sum, 1.0), den_sum)
        tl.store(loss_ptr + two, out, mask=two == 0)
        tl.store(den_ptr + two - 1, out, mask=two == 1)


# grad_p_i = G_i · g / max(den, 1), in place   (G from the forward, g the upstream gradient of the loss)
@triton.jit
def _masked_l1_scale_kernel(
    grad_ptr,  # [n] unscaled gradient from the forward; overwritten with the scaled one
    grad_out_ptr,  # [1] upstream gradient of the scalar loss (any float dtype)
    den_ptr,  # [1] fp32 mask sum from the forward
    n_elements,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    scale = load_scalar_f32(grad_out_ptr) / tl.maximum(load_scalar_f32(den_ptr), 1.0)
    start = pid * (BLOCK * TILES)
    for i in range(0, TILES):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        valid = offs < n_elements
        g = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
        tl.store(grad_ptr + offs, (g * scale).to(grad_ptr.dtype.element_ty), mask=valid)


def _flat_inputs(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor):
    """Contiguous flat views; the mask is broadcast to pred's shape (bool read as uint8)."""
    p = pred.contiguous().reshape(-1)
    t = target.contiguous().reshape(-1)
    m = mask.expand(pred.shape).contiguous().reshape(-1)
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)
    return p, t, m


def masked_l1_forward_launches(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, need_grad: bool = True,
                               ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(loss, den, grad)`` of :func:`masked_l1_forward` and the launch that fills them.

    The launch's ticket counter is zeroed here, once: run the launch once (build it again to rerun).
    """
    p, t, m = _flat_inputs(pred, target, mask)
    n = p.numel()
    block, tiles, programs, warps = elementwise_blocks(n)
    dev = pred.device
    part = new_output((programs, 2), torch.float32, dev)
    loss = new_output((), torch.float32, dev)
    den = new_output((), torch.float32, dev)
    grad = new_output(pred.shape if need_grad else (0,), pred.dtype, dev)
    counter = torch.zeros(1, dtype=torch.int32, device=dev)
    launch = Launch(_masked_l1_kernel, (programs,), (p, t, m, grad, part, counter, loss, den, n, programs),
                    dict(BLOCK=block, TILES=tiles, FINAL_BLOCK=pow2_block(programs, max_block=1024),
                         WRITE_GRAD=need_grad, num_warps=warps))
    return (loss, den, grad), [launch]


def masked_l1_forward(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                      need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(loss, den, grad)``: the 0-d fp32 loss, the 0-d fp32 mask sum, and the unscaled gradient
    ``sign(pred - target) · mask`` (pred's shape and dtype, contiguous; empty when ``need_grad`` is False)."""
    outputs, launches = masked_l1_forward_launches(pred, target, mask, need_grad)
    run_launches(launches)
    return outputs


def masked_l1_backward_launches(grad: torch.Tensor, grad_out: torch.Tensor, den: torch.Tensor) -> list[Launch]:
    """The launch of :func:`masked_l1_backward` (it writes into ``grad``)."""
    n = grad.numel()
    block, tiles, programs, warps = elementwise_blocks(n)
    if n == 0:
        return []
    return [Launch(_masked_l1_scale_kernel, (programs,), (grad.reshape(-1), grad_out.reshape(1), den.reshape(1), n),
                   dict(BLOCK=block, TILES=tiles, num_warps=warps))]


def masked_l1_backward(grad: torch.Tensor, grad_out: torch.Tensor, den: torch.Tensor) -> None:
    """Scale the forward's unscaled gradient in place by ``grad_out / max(den, 1)`` (``grad`` contiguous)."""
    run_launches(masked_l1_backward_launches(grad, grad_out, den))
