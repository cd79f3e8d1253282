"""Centred, sharpened softmax cross-entropy (DINO/iBOT/ASiT self-distillation), fused.

When a row fits one tile (K ≤ 2,048, the local head) the forward is one pass: a program walks a
run of ``ROWS``-row tiles, reads each student and teacher element once, writes the per-row loss
and the gradient ``(softmax(s/τs) - p)/τs``, and keeps the column sums of its raw teacher logits
in registers, written once as a partial row ``[K]``. Wider rows (the global head) are split along
K so that 128 rows still give every SM work: each (row tile, split) program reduces its columns
with an online softmax to five per-row statistics, and a second kernel combines the splits into
the loss and, when a gradient is wanted, re-reads its columns to write the gradient. The partial
column sums are reduced by a small kernel in a fixed order, so ``teacher_sum`` is deterministic
(no atomics).

The backward multiplies the stored gradient, in place, by the upstream per-row gradient; the row
weights and the mean's denominator live in that per-row gradient (the final reduction over
rows is plain PyTorch on an ``[N]`` vector).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    ONE_PASS_MAX_K,
    Launch,
    cdiv,
    column_sum_blocks,
    load_scalar_f32,
    new_output,
    next_power_of_2,
    num_warps_for,
    one_pass_blocks,
    pow2_block,
    row_blocks,
    run_launches,
    split_k_blocks,
)


# Per row i, with a_k = s_ik / τs and b_k = (t_ik - c_k) / τt:
#   p = softmax(b),  log q = a - m_s - log Z_s  (m_s = max a, Z_s = Σ exp(a - m_s))
#   loss_i = -Σ_k p_k log q_k = log Z_s - Σ_k p_k (a_k - m_s)
# Wide rows (split K): program (r, j) walks split j's columns in chunks with an online softmax and
# writes, for its rows, m_s, Z_s, m_t, Z_t and U_j = Σ_{k∈j} exp(b_k - m_t,j) (a_k - m_s,j), rescaled
# whenever a running maximum grows; also the partial column sums P_r,k = Σ_{i∈rows(r)} t_ik of its columns.
@triton.jit
def _distill_ce_split_stats_kernel(
    student_ptr,  # [N, K] student logits (row stride stride_s, unit column stride)
    teacher_ptr,  # [N, K] teacher logits (row stride stride_t, unit column stride)
    center_ptr,  # [K] centre, fp32/fp64
    student_temp_ptr,  # [1] τs
    teacher_temp_ptr,  # [1] τt
    stats_ptr,  # [splits, 5, N] fp32 output: m_s, Z_s, m_t, Z_t, U of each row over the split's columns
    part_ptr,  # [cdiv(N, ROWS), K] fp32 output: per-row-tile teacher column sums
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    split_cols,  # columns per split (a multiple of BLOCK_K)
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    inv_ts = 1.0 / load_scalar_f32(student_temp_ptr)
    inv_tt = 1.0 / load_scalar_f32(teacher_temp_ptr)
    # Finite "minus infinity" keeps (m_s - m_s_new) · 0 = 0 on the first chunk.
    m_s = tl.full([ROWS], -1.0e30, tl.float32)
    z_s = tl.zeros([ROWS], dtype=tl.float32)
    m_t = tl.full([ROWS], -1.0e30, tl.float32)
    z_t = tl.zeros([ROWS], dtype=tl.float32)
    u = tl.zeros([ROWS], dtype=tl.float32)
    k_lo = split * split_cols
    k_hi = tl.minimum(k_lo + split_cols, n_cols)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < k_hi
        ok = row_ok[:, None] & col_ok[None, :]
        s = tl.load(student_ptr + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        c = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(part_ptr + pid * n_cols + cols, tl.sum(t, axis=0), mask=col_ok)
        a_raw = s * inv_ts  # finite everywhere (0 in masked lanes)
        a = tl.where(col_ok[None, :], a_raw, float("-inf"))
        b = tl.where(col_ok[None, :], (t - c[None, :]) * inv_tt, float("-inf"))
        m_s_new = tl.maximum(m_s, tl.max(a, axis=1))
        m_t_new = tl.maximum(m_t, tl.max(b, axis=1))
        z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(a - m_s_new[:, None]), axis=1)
        alpha = tl.exp(m_t - m_t_new)
        z_t_old = z_t * alpha
        # Re-base U on the new maxima (U = 0 and z_t_old = 0 on the first chunk).
        u = u * alpha + (m_s - m_s_new) * z_t_old
        e_b = tl.exp(b - m_t_new[:, None])
        u += tl.sum(e_b * (a_raw - m_s_new[:, None]), axis=1)  # e_b = 0 in masked columns
        z_t = z_t_old + tl.sum(e_b, axis=1)
        m_s = m_s_new
        m_t = m_t_new
    out = stats_ptr + split * 5 * n_rows + rows
    tl.store(out, m_s, mask=row_ok)
    tl.store(out + n_rows, z_s, mask=row_ok)
    tl.store(out + 2 * n_rows, m_t, mask=row_ok)
    tl.store(out + 3 * n_rows, z_t, mask=row_ok)
    tl.store(out + 4 * n_rows, u, mask=row_ok)


# Splits combined (M = max_j m_j, w_j = exp(m_t,j - M_t)):
#   Z_s = Σ_j exp(m_s,j - M_s) Z_s,j,  Z_t = Σ_j w_j Z_t,j,  U = Σ_j w_j (U_j + (m_s,j - M_s) Z_t,j)
#   loss_i = log Z_s - U / Z_t (both terms ≥ 0: no cancellation); grad_ik = (q_ik - p_ik) / τs.
@triton.jit
def _distill_ce_split_finish_kernel(
    student_ptr,  # [N, K] student logits (row stride stride_s, unit column stride)
    teacher_ptr,  # [N, K] teacher logits (row stride stride_t, unit column stride)
    center_ptr,  # [K] centre, fp32/fp64
    student_temp_ptr,  # [1] τs
    teacher_temp_ptr,  # [1] τt
    stats_ptr,  # [splits, 5, N] fp32 from the stats kernel
    loss_ptr,  # [N] fp32 output: per-row loss (written by the programs of split 0)
    grad_ptr,  # [N, K] output (student dtype, contiguous): (q - p) / τs; unused unless WRITE_GRAD
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    split_cols,
    n_splits,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    js = tl.arange(0, BLOCK_S)
    ok_s = row_ok[:, None] & (js < n_splits)[None, :]
    at = stats_ptr + js[None, :] * 5 * n_rows + rows[:, None]  # [ROWS, BLOCK_S]
    m_s_j = tl.load(at, mask=ok_s, other=-1.0e30)
    z_s_j = tl.load(at + n_rows, mask=ok_s, other=0.0)
    m_t_j = tl.load(at + 2 * n_rows, mask=ok_s, other=-1.0e30)
    z_t_j = tl.load(at + 3 * n_rows, mask=ok_s, other=0.0)
    u_j = tl.load(at + 4 * n_rows, mask=ok_s, other=0.0)
    m_s = tl.max(m_s_j, axis=1)
    m_t = tl.max(m_t_j, axis=1)
    z_s = tl.sum(z_s_j * tl.exp(m_s_j - m_s[:, None]), axis=1)
    w = tl.exp(m_t_j - m_t[:, None])
    z_t = tl.sum(w * z_t_j, axis=1)
    u = tl.sum(w * (u_j + (m_s_j - m_s[:, None]) * z_t_j), axis=1)
    tl.store(loss_ptr + rows, tl.log(z_s) - u / z_t, mask=row_ok & (split == 0))
    if WRITE_GRAD:
        inv_ts = 1.0 / load_scalar_f32(student_temp_ptr)
        inv_tt = 1.0 / load_scalar_f32(teacher_temp_ptr)
        inv_zs = 1.0 / z_s
        inv_zt = 1.0 / z_t
        k_lo = split * split_cols
        k_hi = tl.minimum(k_lo + split_cols, n_cols)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < k_hi
            ok = row_ok[:, None] & col_ok[None, :]
            s = tl.load(student_ptr + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0)
            t = tl.load(teacher_ptr + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0)
            c = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            q = tl.exp(s.to(tl.float32) * inv_ts - m_s[:, None]) * inv_zs[:, None]
            p = tl.exp((t.to(tl.float32) - c[None, :]) * inv_tt - m_t[:, None]) * inv_zt[:, None]
            grad = (q - p) * inv_ts
            tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=ok)


# K fits one tile: the same quantities without the online rescaling, from one read of each input.
#   loss_i = log Z_s - U / Z_t,  U = Σ_k exp(b_k - m_t) (a_k - m_s);  grad_ik = (q_ik - p_ik) / τs
# Program q walks row tiles [q·T, (q+1)·T) and writes P_q,k = Σ_{i in its tiles} t_ik.
@triton.jit
def _distill_ce_one_pass_kernel(
    student_ptr,  # [N, K] student logits (row stride stride_s, unit column stride)
    teacher_ptr,  # [N, K] teacher logits (row stride stride_t, unit column stride)
    center_ptr,  # [K] centre, fp32/fp64
    student_temp_ptr,  # [1] τs
    teacher_temp_ptr,  # [1] τt
    loss_ptr,  # [N] fp32 output: per-row loss
    grad_ptr,  # [N, K] output (student dtype, contiguous): (q - p) / τs; unused unless WRITE_GRAD
    part_ptr,  # [programs, K] fp32 output: per-program teacher column sums
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    tiles_per_program,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    inv_ts = 1.0 / load_scalar_f32(student_temp_ptr)
    inv_tt = 1.0 / load_scalar_f32(teacher_temp_ptr)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    c = tl.load(center_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    for tile in range(0, tiles_per_program):
        rows = (pid * tiles_per_program + tile) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & col_ok[None, :]
        s = tl.load(student_ptr + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        t = tl.load(teacher_ptr + rows[:, None] * stride_t + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        col_sum += tl.sum(t, axis=0)
        a_raw = s * inv_ts  # finite everywhere (0 in masked lanes)
        a = tl.where(col_ok[None, :], a_raw, float("-inf"))
        b = tl.where(col_ok[None, :], (t - c[None, :]) * inv_tt, float("-inf"))
        m_s = tl.max(a, axis=1)
        m_t = tl.max(b, axis=1)
        e_a = tl.exp(a - m_s[:, None])
        e_b = tl.exp(b - m_t[:, None])  # 0 in masked columns
        z_s = tl.sum(e_a, axis=1)
        z_t = tl.sum(e_b, axis=1)
        u = tl.sum(e_b * (a_raw - m_s[:, None]), axis=1)
        tl.store(loss_ptr + rows, tl.log(z_s) - u / z_t, mask=row_ok)
        if WRITE_GRAD:
            grad = (e_a * (1.0 / z_s)[:, None] - e_b * (1.0 / z_t)[:, None]) * inv_ts
            tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :], grad.to(grad_ptr.dtype.element_ty),
                     mask=ok)
    tl.store(part_ptr + pid * n_cols + cols, col_sum, mask=col_ok)


# teacher_sum_k = Σ_q P_q,k, summed in a fixed order (deterministic).
@triton.jit
def _column_sum_kernel(
    part_ptr,  # [n_parts, K] fp32 partial column sums
    out_ptr,  # [K] fp32 output
    n_parts,
    n_cols,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    for r0 in range(0, n_parts, ROWS):
        rows = r0 + tl.arange(0, ROWS).to(tl.int64)
        ok = (rows < n_parts)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + rows[:, None] * n_cols + cols[None, :], mask=ok, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)


# grad_s_ik = G_ik · g_i   (G from the forward, g the upstream gradient of the per-row losses)
@triton.jit
def _scale_rows_kernel(
    grad_ptr,  # [N, K] stored gradient, contiguous
    grad_rows_ptr,  # [N] fp32 upstream per-row gradient
    out_ptr,  # [N, K] output, same dtype as grad (may be grad itself: each element is read before it is written)
    n_rows,
    n_cols,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_r = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    rows = pid_r * ROWS + tl.arange(0, ROWS)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None] * n_cols + cols[None, :]
    g = tl.load(grad_rows_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (grad * g[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


def _unit_col_stride(x: torch.Tensor) -> torch.Tensor:
    """Keep row-strided views (e.g. row slices); copy anything whose columns are not adjacent."""
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def distill_ce_forward_launches(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                                student_temp: torch.Tensor, teacher_temp: torch.Tensor, need_grad: bool = True,
                                ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(row_loss, teacher_sum, grad)`` of :func:`distill_ce_forward` and the launches that fill them."""
    n, k = student.shape
    s = _unit_col_stride(student)
    t = _unit_col_stride(teacher)
    c = center.reshape(-1).contiguous()
    dev = student.device
    temps = (student_temp.reshape(1), teacher_temp.reshape(1))
    launches = []
    if k <= ONE_PASS_MAX_K:
        rows, block_k, per_program, programs, warps = one_pass_blocks(n, k)
    else:
        rows, block_k, splits, split_cols, warps = split_k_blocks(n, k)
        programs = cdiv(n, rows)
    loss = new_output((n,), torch.float32, dev)
    grad = new_output((n, k) if need_grad else (0,), student.dtype, dev)
    part = new_output((programs, k), torch.float32, dev)
    teacher_sum = new_output((k,), torch.float32, dev)
    if n > 0 and k <= ONE_PASS_MAX_K:
        launches.append(Launch(_distill_ce_one_pass_kernel, (programs,), (
            s, t, c, *temps, loss, grad, part, n, k, s.stride(0), t.stride(0), per_program),
            dict(ROWS=rows, BLOCK_K=block_k, WRITE_GRAD=need_grad, num_warps=warps)))
    elif n > 0:
        stats = new_output((splits, 5, n), torch.float32, dev)
        launches.append(Launch(_distill_ce_split_stats_kernel, (programs, splits), (
            s, t, c, *temps, stats, part, n, k, s.stride(0), t.stride(0), split_cols),
            dict(ROWS=rows, BLOCK_K=block_k, num_warps=warps)))
        launches.append(Launch(_distill_ce_split_finish_kernel, (programs, splits if need_grad else 1), (
            s, t, c, *temps, stats, loss, grad, n, k, s.stride(0), t.stride(0), split_cols, splits),
            dict(ROWS=rows, BLOCK_K=block_k, BLOCK_S=next_power_of_2(splits), WRITE_GRAD=need_grad,
                 num_warps=warps)))
    if k > 0:
        red_rows, red_k, red_warps = column_sum_blocks(programs, k)
        launches.append(Launch(_column_sum_kernel, (cdiv(k, red_k),), (part, teacher_sum, programs, k),
                               dict(ROWS=red_rows, BLOCK_K=red_k, num_warps=red_warps)))
    return (loss, teacher_sum, grad), launches


def distill_ce_forward(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                       student_temp: torch.Tensor, teacher_temp: torch.Tensor,
                       need_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(row_loss [N] fp32, teacher_sum [K] fp32, grad [N, K] student dtype)``.

    ``grad`` is ``(softmax(s/τs) - p)/τs`` (not yet scaled by any upstream gradient), or an empty
    tensor when ``need_grad`` is False. Temperatures are one-element tensors (no recompilation and
    no host sync when they change).
    """
    outputs, launches = distill_ce_forward_launches(student, teacher, center, student_temp, teacher_temp, need_grad)
    run_launches(launches)
    return outputs


def distill_ce_backward_launches(grad: torch.Tensor, grad_rows: torch.Tensor) -> list[Launch]:
    """The launch of :func:`distill_ce_backward` (it writes into ``grad``)."""
    n, k = grad.shape
    g = grad_rows.reshape(-1).to(torch.float32).contiguous()
    rows, block_k = row_blocks(n, pow2_block(k, max_block=1024))
    if n == 0 or k == 0:
        return []
    return [Launch(_scale_rows_kernel, (cdiv(n, rows), cdiv(k, block_k)), (grad, g, grad, n, k),
                   dict(ROWS=rows, BLOCK_K=block_k, num_warps=num_warps_for(rows * block_k)))]


def distill_ce_backward(grad: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """Scale the forward's gradient in place: ``grad *= grad_rows[:, None]`` in fp32 (``grad`` contiguous)."""
    run_launches(distill_ce_backward_launches(grad, grad_rows))
