"""GMML corruption painter: apply sampled rectangular blocks to a batch of spectrograms.

One program owns one band of ``p`` rows (one row of tokens) and ``TOKENS`` whole patches along
the width of one sample. It loads the boxes of that sample up to its last non-empty one (the
sync-free sampler leaves long blank tails) in chunks, counts the boxes covering each pixel as a
small integer matrix product (row membership × column membership), writes the
corrupted pixels of all channels (0, or the pixel of ``x[source]`` at the same position), the
bool mask, and the corrupted fraction of each of its patches — counted exactly in integers, then
divided once with round-to-nearest, which is what ``avg_pool2d`` of a 0/1 mask produces.

Pixels are moved as raw bits (integer views of the same width), so the output is bit-identical
to the PyTorch reference for every float dtype. Forward only: the corrupted view is the student
input, not something to differentiate through.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import GMML_BOX_CHUNK, Launch, cdiv, gmml_blocks, new_output, next_power_of_2, num_warps_for, run_launches

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


# hit(b, y, x) = ∨_m [top_m ≤ y < top_m + h_m] ∧ [left_m ≤ x < left_m + w_m]
# out(b, c, y, x) = hit ? (alien_b ? x(source_b, c, y, x) : 0) : x(b, c, y, x)
# frac(b, ty, tx) = (Σ_{patch (ty, tx)} hit) / p²
@triton.jit
def _gmml_corrupt_kernel(
    x_ptr,  # [B, C, H, W] input as integer bits, contiguous
    boxes_ptr,  # [B, M, 4] int32/int64 (top, left, height, width), contiguous
    nbox_ptr,  # [B] int32: boxes past this many are empty for this sample (the loop stops there)
    alien_ptr,  # [B] uint8 (bool view): 1 = fill from source, 0 = fill with zeros
    source_ptr,  # [B] int32/int64 batch index of the alien source
    out_ptr,  # [B, C, H, W] output bits, contiguous
    mask_ptr,  # [B, 1, H, W] uint8 output (bool view)
    frac_ptr,  # [B, HT * WT] fp32 output: corrupted fraction per token
    n_channels,
    height,
    width,
    n_boxes,
    tokens_h,  # HT = H // p
    tokens_w,  # WT = W // p
    PATCH: tl.constexpr,
    BLOCK_P: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    band = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2).to(tl.int64)
    r_idx = tl.arange(0, BLOCK_P)
    c_idx = tl.arange(0, BLOCK_W)
    rows = band * PATCH + r_idx
    cols = tile * (TOKENS * PATCH) + c_idx
    row_ok = (r_idx < PATCH) & (rows < height)
    col_ok = (c_idx < TOKENS * PATCH) & (cols < width)
    ok = row_ok[:, None] & col_ok[None, :]

    # Boxes in chunks of BLOCK_M, each loaded once: R[y, m] = row y inside box m, C[m, x] = column x
    # inside box m, so (R @ C)[y, x] counts the boxes covering a pixel exactly (int8 products, int32
    # sums). Boxes that miss this band's rows have zero rows in R and add nothing.
    one = tl.arange(0, 1)
    n_used = tl.sum(tl.load(nbox_ptr + b + one, mask=one < 1, other=0), axis=0)
    m_idx = tl.arange(0, BLOCK_M)
    py = rows.to(tl.int32)  # pixel coordinates fit in int32 (the offsets below stay int64)
    px = cols.to(tl.int32)
    count = tl.zeros([BLOCK_P, BLOCK_W], dtype=tl.int32)
    for m0 in range(0, n_used, BLOCK_M):
        box = boxes_ptr + (b * n_boxes + m0 + m_idx) * 4
        m_ok = m0 + m_idx < n_used
        top = tl.load(box, mask=m_ok, other=0).to(tl.int32)
        left = tl.load(box + 1, mask=m_ok, other=0).to(tl.int32)
        bh = tl.load(box + 2, mask=m_ok, other=0).to(tl.int32)
        bw = tl.load(box + 3, mask=m_ok, other=0).to(tl.int32)
        in_r = (py[:, None] >= top[None, :]) & (py[:, None] < (top + bh)[None, :])  # [BLOCK_P, BLOCK_M]
        in_c = (px[None, :] >= left[:, None]) & (px[None, :] < (left + bw)[:, None])  # [BLOCK_M, BLOCK_W]
        count = tl.dot(in_r.to(tl.int8), in_c.to(tl.int8), count, out_dtype=tl.int32)  # triton 3.6 needs out_dtype
    hit = count > 0
    hit = hit & ok

    alien = tl.sum(tl.load(alien_ptr + b + one, mask=one < 1, other=0).to(tl.int32), axis=0) != 0
    src = tl.sum(tl.load(source_ptr + b + one, mask=one < 1, other=0).to(tl.int64), axis=0)
    pix = rows[:, None] * width + cols[None, :]
    for ch in range(0, n_channels):
        plane = (b * n_channels + ch) * height * width
        src_plane = (src * n_channels + ch) * height * width
        x = tl.load(x_ptr + plane + pix, mask=ok, other=0)
        fill = tl.load(x_ptr + src_plane + pix, mask=hit & alien, other=0)
        tl.store(out_ptr + plane + pix, tl.where(hit, fill, x), mask=ok)
    tl.store(mask_ptr + b * height * width + pix, hit.to(tl.uint8), mask=ok)

    # Per-patch counts: column sums of the band, then grouped by token (one-hot over the tile).
    col_hits = tl.sum(hit.to(tl.int32), axis=0)  # [BLOCK_W]
    t_idx = tl.arange(0, BLOCK_T)
    same = (c_idx // PATCH)[:, None] == t_idx[None, :]
    counts = tl.sum(tl.where(same, col_hits[:, None], 0), axis=0)  # [BLOCK_T]
    frac = tl.math.div_rn(counts.to(tl.float32), tl.full([BLOCK_T], PATCH * PATCH, tl.float32))
    tok_x = tile * TOKENS + t_idx
    tok_ok = (t_idx < TOKENS) & (tok_x < tokens_w) & (band < tokens_h)
    tl.store(frac_ptr + b * tokens_h * tokens_w + band * tokens_w + tok_x, frac, mask=tok_ok)


def gmml_forward_launches(x: torch.Tensor, boxes: torch.Tensor, alien: torch.Tensor, source: torch.Tensor,
                          patch_size: int) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], list[Launch]]:
    """Outputs ``(corrupted, mask, token_fraction)`` of :func:`gmml_forward` and the launch that fills them."""
    b, c, h, w = x.shape
    xc = x.contiguous()
    bits = _BITS[xc.element_size()]
    corrupted = new_output(xc.shape, xc.dtype, xc.device)
    mask = new_output((b, 1, h, w), torch.bool, x.device)
    tokens_h, tokens_w = h // patch_size, w // patch_size
    frac = new_output((b, tokens_h * tokens_w), torch.float32, x.device)
    block_p, tokens, block_w = gmml_blocks(patch_size)
    grid = (b, cdiv(h, patch_size), cdiv(w, tokens * patch_size))
    launches = []
    if b * h * w > 0:
        # per sample, 1 + the index of its last non-empty box: the painter loops only that far (the
        # sampler blanks the slots after each sample's prefix, up to its budget), computed on the device
        m = boxes.shape[1]
        nonempty = (boxes[..., 2] > 0) & (boxes[..., 3] > 0)  # [B, M]
        order = torch.arange(1, m + 1, dtype=torch.int32, device=boxes.device)
        n_used = (nonempty.to(torch.int32) * order).amax(dim=1) if m else boxes.new_zeros(b, dtype=torch.int32)
        launches.append(Launch(_gmml_corrupt_kernel, grid, (
            xc.view(bits), boxes.contiguous(), n_used.contiguous(), alien.contiguous().view(torch.uint8),
            source.contiguous(),
            corrupted.view(bits), mask.view(torch.uint8), frac, c, h, w, boxes.shape[1], tokens_h, tokens_w),
            dict(PATCH=patch_size, BLOCK_P=block_p, TOKENS=tokens, BLOCK_T=next_power_of_2(tokens),
                 BLOCK_W=block_w, BLOCK_M=GMML_BOX_CHUNK, num_warps=num_warps_for(block_p * block_w))))
    return (corrupted, mask, frac), launches


def gmml_forward(x: torch.Tensor, boxes: torch.Tensor, alien: torch.Tensor, source: torch.Tensor,
                 patch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(corrupted [B, C, H, W], mask bool [B, 1, H, W], token_fraction fp32 [B, HT·WT])``."""
    outputs, launches = gmml_forward_launches(x, boxes, alien, source, patch_size)
    run_launches(launches)
    return outputs
