"""Centred, sharpened softmax cross-entropy (DINO/iBOT/ASiT self-distillation), fused.

When a row fits one tile (K ≤ 2,048, the local head) the forward is one pass: a program walks a
run of ``ROWS``-row tiles, reads each student and teacher element once, writes the per-row loss
and the gradient ``(softmax(s/τs) - p)/τs``, and keeps the column sums of its raw teacher logits
in registers, written once as a partial row ``[K]``. A second kernel sums those partial rows on a
2-D grid (32-column blocks × groups of 16 partial rows, enough programs to fill the GPU): each
program writes its group's sum, and the last group of a column block to finish (an atomic ticket)
adds the group sums in group order.

Wider rows (the global head) are split along K into tiles of at most 16 rows, sized so that even
128 × 8,192 makes 1,024 programs. Program (row tile, split) reduces its columns with an online
softmax to five per-row statistics and writes the partial column sums of its tile's rows; the
last split of a row tile to finish combines the splits' statistics into the loss and the per-row
softmax statistics, and the last row tile of a split to finish sums that split's partial columns
in row-tile order. When a gradient is wanted, a second kernel re-reads the inputs and writes it
from those statistics. (With more than ``SPLIT_FUSED_SUM_MAX_PARTS`` row tiles the partial columns
go to the column-sum kernel instead.)

Every sum runs in a fixed order whichever program finishes last, so ``teacher_sum``, the loss and
the gradient are run-to-run identical (the tickets decide only who adds, never the order). The
ticket counters are int32s allocated zeroed with each forward (one small memset on the launching
stream, captured with the kernels into any CUDA graph), so no two launches, streams or graphs ever
share one, and their number grows with the launch.

The backward multiplies the stored gradient, in place, by the upstream per-row gradient; the row
weights and the mean's denominator live in that per-row gradient (the final reduction over
rows is plain PyTorch on an ``[N]`` vector).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    GRAD_MIN_TILE,
    GRAD_TARGET_PROGRAMS,
    ONE_PASS_MAX_K,
    SPLIT_FUSED_SUM_MAX_PARTS,
    Launch,
    cdiv,
    column_sum_blocks,
    grid_tile_blocks,
    load_scalar_f32,
    new_output,
    next_power_of_2,
    one_pass_blocks,
    run_launches,
    split_k_blocks,
)


# Per row i, with a_k = s_ik / τs and b_k = (t_ik - c_k) / τt:
#   p = softmax(b),  log q = a - m_s - log Z_s  (m_s = max a, Z_s = Σ exp(a - m_s))
#   loss_i = -Σ_k p_k log q_k = log Z_s - Σ_k p_k (a_k - m_s) = log Z_s - U / Z_t
# Wide rows (split K): program (r, j) walks split j's columns in chunks with an online softmax and
# writes, for its rows, m_s, Z_s, m_t, Z_t and U_j = Σ_{k∈j} exp(b_k - m_t,j) (a_k - m_s,j), rescaled
# whenever a running maximum grows; also the partial column sums P_r,k = Σ_{i∈rows(r)} t_ik of its columns.
# Splits combined (M = max_j m_j, w_j = exp(m_t,j - M_t)) by the last split of row tile r to finish:
#   Z_s = Σ_j exp(m_s,j - M_s) Z_s,j,  Z_t = Σ_j w_j Z_t,j,  U = Σ_j w_j (U_j + (m_s,j - M_s) Z_t,j)
# (online over chunks of splits); it writes loss_i and (M_s, Z_s, M_t, Z_t) for the gradient kernel.
# With FUSED_SUM, the last row tile of split j to finish writes teacher_sum_k = Σ_r P_r,k (r in order).
@triton.jit
def _distill_ce_split_stats_kernel(
    student_ptr,  # [N, K] student logits (row stride stride_s, unit column stride)
    teacher_ptr,  # [N, K] teacher logits (row stride stride_t, unit column stride)
    center_ptr,  # [K] centre, fp32/fp64
    student_temp_ptr,  # [1] τs
    teacher_temp_ptr,  # [1] τt
    stats_ptr,  # [splits · 5 + 4, N] fp32: m_s, Z_s, m_t, Z_t, U of each split, then the combined M_s, Z_s, M_t, Z_t
    loss_ptr,  # [N] fp32 output: per-row loss
    part_ptr,  # [row tiles (+ groups), K] fp32: per-row-tile teacher column sums
    sum_ptr,  # [K] fp32 output teacher_sum (written when FUSED_SUM)
    count_ptr,  # [row tiles (+ splits when FUSED_SUM)] int32 ticket counters, zero on entry (fresh per launch)
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    split_cols,  # columns per split (a multiple of BLOCK_K)
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_S: tl.constexpr,  # splits combined at once
    BLOCK_P: tl.constexpr,  # partial rows summed at once (FUSED_SUM)
    FUSED_SUM: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    n_tiles = tl.num_programs(0)
    n_splits = tl.num_programs(1)
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
        tl.store(part_ptr + pid * n_cols + cols, tl.sum(t, axis=0), mask=col_ok, cache_modifier=".wt")
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
    tl.store(out, m_s, mask=row_ok, cache_modifier=".wt")
    tl.store(out + n_rows, z_s, mask=row_ok, cache_modifier=".wt")
    tl.store(out + 2 * n_rows, m_t, mask=row_ok, cache_modifier=".wt")
    tl.store(out + 3 * n_rows, z_t, mask=row_ok, cache_modifier=".wt")
    tl.store(out + 4 * n_rows, u, mask=row_ok, cache_modifier=".wt")
    # The ticket pattern of the masked L1 kernel: write-through stores, barrier, one-thread acq_rel
    # ticket; the last program reads the others' results from L2 (.cg: not the SM's L1).
    tl.debug_barrier()
    if tl.atomic_add(count_ptr + pid, 1, sem="acq_rel", scope="gpu") == n_splits - 1:
        m_s = tl.full([ROWS], -1.0e30, tl.float32)
        z_s = tl.zeros([ROWS], dtype=tl.float32)
        m_t = tl.full([ROWS], -1.0e30, tl.float32)
        z_t = tl.zeros([ROWS], dtype=tl.float32)
        u = tl.zeros([ROWS], dtype=tl.float32)
        for j0 in range(0, n_splits, BLOCK_S):
            js = (j0 + tl.arange(0, BLOCK_S)).to(tl.int64)  # js · 5 · N can pass 2^31
            ok_s = row_ok[:, None] & (js < n_splits)[None, :]
            at = stats_ptr + js[None, :] * 5 * n_rows + rows[:, None]  # [ROWS, BLOCK_S]
            m_s_j = tl.load(at, mask=ok_s, other=-1.0e30, cache_modifier=".cg")
            z_s_j = tl.load(at + n_rows, mask=ok_s, other=0.0, cache_modifier=".cg")
            m_t_j = tl.load(at + 2 * n_rows, mask=ok_s, other=-1.0e30, cache_modifier=".cg")
            z_t_j = tl.load(at + 3 * n_rows, mask=ok_s, other=0.0, cache_modifier=".cg")
            u_j = tl.load(at + 4 * n_rows, mask=ok_s, other=0.0, cache_modifier=".cg")
            m_s_new = tl.maximum(m_s, tl.max(m_s_j, axis=1))
            m_t_new = tl.maximum(m_t, tl.max(m_t_j, axis=1))
            alpha = tl.exp(m_t - m_t_new)
            w = tl.exp(m_t_j - m_t_new[:, None])
            u = alpha * (u + (m_s - m_s_new) * z_t) + tl.sum(w * (u_j + (m_s_j - m_s_new[:, None]) * z_t_j), axis=1)
            z_s = z_s * tl.exp(m_s - m_s_new) + tl.sum(z_s_j * tl.exp(m_s_j - m_s_new[:, None]), axis=1)
            z_t = alpha * z_t + tl.sum(w * z_t_j, axis=1)
            m_s = m_s_new
            m_t = m_t_new
        z_s = tl.where(row_ok, z_s, 1.0)  # rows past the end: no log(0) or 0/0, even in masked lanes
        z_t = tl.where(row_ok, z_t, 1.0)
        tl.store(loss_ptr + rows, tl.log(z_s) - u / z_t, mask=row_ok)
        final = stats_ptr + n_splits.to(tl.int64) * 5 * n_rows + rows
        tl.store(final, m_s, mask=row_ok)
        tl.store(final + n_rows, z_s, mask=row_ok)
        tl.store(final + 2 * n_rows, m_t, mask=row_ok)
        tl.store(final + 3 * n_rows, z_t, mask=row_ok)
    if FUSED_SUM:
        if tl.atomic_add(count_ptr + n_tiles + split, 1, sem="acq_rel", scope="gpu") == n_tiles - 1:
            for k0 in range(k_lo, k_hi, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_ok = cols < k_hi
                acc = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
                for p0 in range(0, n_tiles, BLOCK_P):
                    ps = p0 + tl.arange(0, BLOCK_P).to(tl.int64)
                    ok = (ps < n_tiles)[:, None] & col_ok[None, :]
                    acc += tl.load(part_ptr + ps[:, None] * n_cols + cols[None, :], mask=ok, other=0.0,
                                   cache_modifier=".cg")
                tl.store(sum_ptr + cols, tl.sum(acc, axis=0), mask=col_ok)


# grad_ik = (q_ik - p_ik) / τs from the combined statistics of row i.
@triton.jit
def _distill_ce_split_grad_kernel(
    student_ptr,  # [N, K] student logits (row stride stride_s, unit column stride)
    teacher_ptr,  # [N, K] teacher logits (row stride stride_t, unit column stride)
    center_ptr,  # [K] centre, fp32/fp64
    student_temp_ptr,  # [1] τs
    teacher_temp_ptr,  # [1] τt
    final_ptr,  # [4, N] fp32 from the stats kernel: M_s, Z_s, M_t, Z_t
    grad_ptr,  # [N, K] output (student dtype, contiguous): (q - p) / τs
    n_rows,
    n_cols,
    stride_s,
    stride_t,
    split_cols,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    m_s = tl.load(final_ptr + rows, mask=row_ok, other=0.0)
    inv_zs = 1.0 / tl.load(final_ptr + n_rows + rows, mask=row_ok, other=1.0)
    m_t = tl.load(final_ptr + 2 * n_rows + rows, mask=row_ok, other=0.0)
    inv_zt = 1.0 / tl.load(final_ptr + 3 * n_rows + rows, mask=row_ok, other=1.0)
    inv_ts = 1.0 / load_scalar_f32(student_temp_ptr)
    inv_tt = 1.0 / load_scalar_f32(teacher_temp_ptr)
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
        tl.store(grad_ptr + rows[:, None] * n_cols + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=ok)


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


# teacher_sum_k = Σ_g S_g,k with S_g,k = Σ_{q in group g} P_q,k: program (c, g) sums group g of the
# partial rows over column block c and writes S_g; the last of column block c's groups to finish
# (a ticket) sums S_0..S_{G-1} in order. Fixed order throughout: run-to-run identical.
@triton.jit
def _column_sum_kernel(
    part_ptr,  # [n_parts + groups, K] fp32: the partial rows P, then the group sums S (written here)
    out_ptr,  # [K] fp32 output
    count_ptr,  # [cdiv(K, BLOCK_K)] int32 ticket counters, zero on entry (fresh per launch)
    n_parts,
    n_cols,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    block = tl.program_id(0)
    group = tl.program_id(1).to(tl.int64)
    n_groups = tl.num_programs(1)
    cols = block.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < n_cols
    rows = group * ROWS + tl.arange(0, ROWS)
    ok = (rows < n_parts)[:, None] & col_ok[None, :]
    part = tl.load(part_ptr + rows[:, None] * n_cols + cols[None, :], mask=ok, other=0.0)
    tl.store(part_ptr + (n_parts + group) * n_cols + cols, tl.sum(part, axis=0), mask=col_ok, cache_modifier=".wt")
    tl.debug_barrier()  # every thread's group sum is stored before the (one-thread) ticket below releases it
    if tl.atomic_add(count_ptr + block, 1, sem="acq_rel", scope="gpu") == n_groups - 1:
        acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
        for g0 in range(0, n_groups, ROWS):
            gs = g0 + tl.arange(0, ROWS).to(tl.int64)
            ok = (gs < n_groups)[:, None] & col_ok[None, :]
            acc += tl.load(part_ptr + (n_parts + gs[:, None]) * n_cols + cols[None, :], mask=ok, other=0.0,
                           cache_modifier=".cg")
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


def _counters(n: int, device: torch.device) -> torch.Tensor:
    """``n`` zeroed int32 ticket counters for one forward's launches (never kept: a CUDA graph that
    captured a launch owns its counters, and concurrent launches never share them)."""
    return torch.zeros(n, dtype=torch.int32, device=device)


def _column_sum_counters(n_parts: int, k: int) -> int:
    """Ticket counters of :func:`_column_sum_launch`: one per column block."""
    return cdiv(k, column_sum_blocks(n_parts, k)[1])


def _column_sum_launch(part: torch.Tensor, n_parts: int, teacher_sum: torch.Tensor, counters: torch.Tensor) -> Launch:
    """The two-level column sum of the first ``n_parts`` rows of ``part`` into ``teacher_sum``; ``counters``
    holds at least :func:`_column_sum_counters` zeros."""
    k = part.shape[1]
    rows, block_k, groups, warps = column_sum_blocks(n_parts, k)
    return Launch(_column_sum_kernel, (cdiv(k, block_k), groups), (part, teacher_sum, counters, n_parts, k),
                  dict(ROWS=rows, BLOCK_K=block_k, num_warps=warps))


def distill_ce_forward_launches(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor,
                                student_temp: torch.Tensor, teacher_temp: torch.Tensor, need_grad: bool = True,
                                ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(row_loss, teacher_sum, grad)`` of :func:`distill_ce_forward` and the launches that fill them.

    The launches' ticket counters are zeroed here, once: run the list once (build it again to rerun).
    """
    n, k = student.shape
    s = _unit_col_stride(student)
    t = _unit_col_stride(teacher)
    c = center.reshape(-1).contiguous()
    dev = student.device
    temps = (student_temp.reshape(1), teacher_temp.reshape(1))
    loss = new_output((n,), torch.float32, dev)
    grad = new_output((n, k) if need_grad else (0,), student.dtype, dev)
    teacher_sum = new_output((k,), torch.float32, dev)
    if n == 0 or k == 0:
        if k > 0:
            teacher_sum.zero_()
        return (loss, teacher_sum, grad), []
    if k <= ONE_PASS_MAX_K:
        rows, block_k, per_program, programs, warps = one_pass_blocks(n, k)
        part = new_output((programs + column_sum_blocks(programs, k)[2], k), torch.float32, dev)
        launches = [Launch(_distill_ce_one_pass_kernel, (programs,), (
            s, t, c, *temps, loss, grad, part, n, k, s.stride(0), t.stride(0), per_program),
            dict(ROWS=rows, BLOCK_K=block_k, WRITE_GRAD=need_grad, num_warps=warps))]
        counters = _counters(_column_sum_counters(programs, k), dev)
        launches.append(_column_sum_launch(part, programs, teacher_sum, counters))
        return (loss, teacher_sum, grad), launches
    rows, block_k, splits, split_cols, warps = split_k_blocks(n, k)
    tiles = cdiv(n, rows)
    fused = tiles <= SPLIT_FUSED_SUM_MAX_PARTS
    part = new_output((tiles + (0 if fused else column_sum_blocks(tiles, k)[2]), k), torch.float32, dev)
    stats = new_output((splits * 5 + 4, n), torch.float32, dev)
    # one memset for all: row tiles' tickets, then the splits' (fused sum) or the column blocks' (separate sum)
    counters = _counters(tiles + (splits if fused else _column_sum_counters(tiles, k)), dev)
    launches = [Launch(_distill_ce_split_stats_kernel, (tiles, splits), (
        s, t, c, *temps, stats, loss, part, teacher_sum, counters, n, k, s.stride(0),
        t.stride(0), split_cols),
        dict(ROWS=rows, BLOCK_K=block_k, BLOCK_S=max(1, min(next_power_of_2(splits), 1024 // rows)),
             BLOCK_P=max(1, min(next_power_of_2(tiles), 4096 // block_k)), FUSED_SUM=fused, num_warps=warps))]
    if need_grad:
        g_rows, g_block_k, g_splits, g_split_cols, g_warps = split_k_blocks(
            n, k, target=GRAD_TARGET_PROGRAMS, min_tile=GRAD_MIN_TILE)
        launches.append(Launch(_distill_ce_split_grad_kernel, (cdiv(n, g_rows), g_splits), (
            s, t, c, *temps, stats[splits * 5:], grad, n, k, s.stride(0), t.stride(0), g_split_cols),
            dict(ROWS=g_rows, BLOCK_K=g_block_k, num_warps=g_warps)))
    if not fused:
        launches.append(_column_sum_launch(part, tiles, teacher_sum, counters[tiles:]))
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
    rows, block_k, warps = grid_tile_blocks(n, k, target=GRAD_TARGET_PROGRAMS, min_tile=GRAD_MIN_TILE)
    if n == 0 or k == 0:
        return []
    return [Launch(_scale_rows_kernel, (cdiv(n, rows), cdiv(k, block_k)), (grad, g, grad, n, k),
                   dict(ROWS=rows, BLOCK_K=block_k, num_warps=warps))]


def distill_ce_backward(grad: torch.Tensor, grad_rows: torch.Tensor) -> None:
    """Scale the forward's gradient in place: ``grad *= grad_rows[:, None]`` in fp32 (``grad`` contiguous)."""
    run_launches(distill_ce_backward_launches(grad, grad_rows))
