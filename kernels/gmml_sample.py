"""GMML sampling on the device: each sample's shortest prefix of candidate boxes that covers its target.

The sampler draws ``M`` candidate boxes per sample; a sample keeps the smallest ``k`` whose first ``k``
boxes cover at least ``need`` pixels. Two launches find every ``k`` at once, whatever ``M``:

1. *first cover*: one program per (sample, tile of ``BLOCK_R × BLOCK_C`` pixels) walks its sample's
   boxes in draw order, ``BLOCK_M`` at a time, and keeps for each pixel the index of the first box
   that covers it (``M`` if none). It stops as soon as every pixel of its tile is covered (a later
   box cannot lower a minimum), then adds the tile's histogram of those indices to the sample's
   histogram ``hist[b, j]`` (pixels whose first cover is box ``j``) with integer atomics: exact and
   independent of the order the programs run in. It can also store the first-cover map itself.
2. *prefix*: one program per sample. The union of the first ``k`` boxes covers ``cumsum(hist)[k-1]``
   pixels, so the count is one plus the number of ``j`` whose running sum is still below ``need``
   (compared in ``need``'s float dtype, as the PyTorch search compares its float32 areas):
   ``M + 1`` when even all ``M`` boxes fall short.

A box covers the pixels ``top <= y < top + height``, ``left <= x < left + width``: an empty box (height
or width ≤ 0) covers nothing and a box past the border is clipped, as the painter reads them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import Launch, cdiv, new_output, next_power_of_2, run_launches

# Tile of the first-cover kernel: BLOCK_R rows × up to BLOCK_C columns of one sample, against
# BLOCK_M boxes at a time: 4 pixels × 8 boxes a thread on 4 warps (48 registers on sm_90, 10 blocks
# per SM; 16 boxes a step take 56 registers for about the same instructions per comparison).
FIRST_COVER_ROWS = 8
FIRST_COVER_COLS = 64
FIRST_COVER_BOXES = 8
FIRST_COVER_WARPS = 4
# Largest M whose histogram a first-cover program builds with tl.histogram (bins = next power of two
# >= M; a tile has 512 pixels); past it, each pixel adds itself to its sample's histogram with an atomic.
HIST_MAX_BINS = 1024
# Prefix kernel: histogram bins per step of its running sum.
PREFIX_BLOCK = 1024


# first(b, y, x) = min { m : top_m <= y < top_m + h_m and left_m <= x < left_m + w_m }  (M if none)
# hist(b, j) = #{ (y, x) : first(b, y, x) = j },  j < M
@triton.jit
def _gmml_first_cover_kernel(
    boxes_ptr,  # [B, M, 4] int32/int64 (top, left, height, width), contiguous
    first_ptr,  # [B, H, W] int16/int32 output: index of the first covering box (STORE_FIRST only)
    hist_ptr,  # [B, M] int32, zero on entry: pixels whose first cover is box j
    height,
    width,
    n_boxes,
    STORE_FIRST: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BINS: tl.constexpr,  # next power of two >= M; 0: one atomic per pixel instead of a tile histogram
):
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = (rows < height)[:, None] & (cols < width)[None, :]
    m_idx = tl.arange(0, BLOCK_M)
    first = tl.full([BLOCK_R, BLOCK_C], n_boxes, dtype=tl.int32)
    # pixels outside the image never hold the loop: it runs while some pixel of the tile is uncovered
    open_pixels = tl.sum(ok.to(tl.int32))
    m0 = 0
    while (m0 < n_boxes) & (open_pixels > 0):
        m = m0 + m_idx
        m_ok = m < n_boxes
        box = boxes_ptr + (b * n_boxes + m) * 4
        top = tl.load(box, mask=m_ok, other=0).to(tl.int32)
        left = tl.load(box + 1, mask=m_ok, other=0).to(tl.int32)
        bh = tl.load(box + 2, mask=m_ok, other=0).to(tl.int32)  # masked slots: height 0, cover nothing
        bw = tl.load(box + 3, mask=m_ok, other=0).to(tl.int32)
        # boxes on the leading axis: each thread holds all BLOCK_M boxes of its pixels, so the minimum
        # over boxes stays in its registers
        in_r = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + bh)[:, None])  # [BLOCK_M, BLOCK_R]
        in_c = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + bw)[:, None])  # [BLOCK_M, BLOCK_C]
        hit = in_r[:, :, None] & in_c[:, None, :]  # [BLOCK_M, BLOCK_R, BLOCK_C]
        first = tl.minimum(first, tl.min(tl.where(hit, m[:, None, None], n_boxes), axis=0))
        open_pixels = tl.sum((ok & (first == n_boxes)).to(tl.int32))
        m0 += BLOCK_M

    if STORE_FIRST:
        pix = b * height * width + rows[:, None] * width + cols[None, :]
        tl.store(first_ptr + pix, first.to(first_ptr.dtype.element_ty), mask=ok)
    counted = ok & (first < n_boxes)
    if BINS > 0:
        hist = tl.histogram(tl.reshape(first, [BLOCK_R * BLOCK_C]), BINS,
                            mask=tl.reshape(counted, [BLOCK_R * BLOCK_C]))
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_ptr + b * n_boxes + bins, hist, mask=(bins < n_boxes) & (hist > 0), sem="relaxed")
    else:
        ones = tl.full([BLOCK_R, BLOCK_C], 1, dtype=tl.int32)
        tl.atomic_add(hist_ptr + b * n_boxes + first, ones, mask=counted, sem="relaxed")


# count(b) = 1 + #{ j < M : Σ_{i <= j} hist(b, i) < need(b) }   (M + 1: all M boxes fall short)
@triton.jit
def _gmml_prefix_kernel(
    hist_ptr,  # [B, M] int32
    need_ptr,  # [B] float32/float64: pixels each sample must cover
    count_ptr,  # [B] int64 output
    n_boxes,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    one = tl.arange(0, 1)
    need = tl.sum(tl.load(need_ptr + b + one, mask=one < 1, other=0), axis=0)
    k_idx = tl.arange(0, BLOCK_K)
    carry = tl.sum(tl.zeros([1], dtype=tl.int32), axis=0)
    below = tl.sum(tl.zeros([1], dtype=tl.int64), axis=0)
    for k0 in range(0, n_boxes, BLOCK_K):
        k = k0 + k_idx
        k_ok = k < n_boxes
        h = tl.load(hist_ptr + b * n_boxes + k, mask=k_ok, other=0)
        covered = tl.cumsum(h, axis=0) + carry  # union area of the first k + 1 boxes (exact in int32)
        below += tl.sum((k_ok & (covered.to(need.dtype) < need)).to(tl.int64))
        carry += tl.sum(h)
    tl.store(count_ptr + b + one, (below + 1) + tl.zeros([1], dtype=tl.int64), mask=one < 1)


def first_cover_dtype(n_boxes: int) -> torch.dtype:
    """dtype of the first-cover map: int16 while box indices and ``M`` fit in it, else int32."""
    return torch.int16 if n_boxes < 2**15 else torch.int32


def gmml_prefix_launches(boxes: torch.Tensor, need: torch.Tensor, height: int, width: int,
                         store_first: bool = False) -> tuple[tuple[torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(count, first)`` of :func:`gmml_prefix` and the two launches that fill them."""
    b, m, _ = boxes.shape
    count = new_output((b,), torch.int64, boxes.device)
    first = new_output((b, height, width) if store_first else (0,), first_cover_dtype(m), boxes.device)
    hist = torch.zeros((b, max(m, 1)), dtype=torch.int32, device=boxes.device)
    block_c = min(FIRST_COVER_COLS, max(16, next_power_of_2(width)))
    bins = max(32, next_power_of_2(m))
    bins = bins if bins <= HIST_MAX_BINS else 0
    launches = []
    if b > 0:
        launches.append(Launch(_gmml_first_cover_kernel,
                               (b, cdiv(height, FIRST_COVER_ROWS), cdiv(width, block_c)),
                               (boxes.contiguous(), first, hist, height, width, m),
                               dict(STORE_FIRST=store_first, BLOCK_R=FIRST_COVER_ROWS, BLOCK_C=block_c,
                                    BLOCK_M=FIRST_COVER_BOXES, BINS=bins,
                                    num_warps=FIRST_COVER_WARPS)))
        launches.append(Launch(_gmml_prefix_kernel, (b,), (hist, need.contiguous(), count, m),
                               dict(BLOCK_K=min(PREFIX_BLOCK, max(32, next_power_of_2(m))), num_warps=4)))
    return (count, first), launches


def gmml_prefix(boxes: torch.Tensor, need: torch.Tensor, height: int, width: int,
                store_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the smallest ``k`` whose first ``k`` boxes cover at least ``need`` pixels.

    Args:
        boxes: ``[B, M, 4]`` int32/int64 ``(top, left, height, width)`` in draw order, ``M >= 1``.
        need: ``[B]`` float32/float64 pixels to cover (compared in that dtype with exact counts).
        height, width: the image size (``height · width < 2^31``).
        store_first: also return the first-cover map.

    Returns:
        ``count`` int64 ``[B]`` in ``[1, M + 1]`` (``M + 1``: the ``M`` boxes together fall short), and
        ``first`` ``[B, H, W]`` (int16, or int32 when ``M >= 2^15``): the index of each pixel's first
        covering box, ``M`` if none; an empty tensor unless ``store_first``.
    """
    outputs, launches = gmml_prefix_launches(boxes, need, height, width, store_first)
    run_launches(launches)
    return outputs
