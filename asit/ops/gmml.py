"""GMML corruption: sample rectangular blocks until their union covers a target fraction,
then zero them or fill them with the same pixels of another spectrogram of the batch.

Sampling and painting are separate. :func:`sample_gmml_blocks` draws all randomness with a
``torch.Generator`` on the tensors' device; :func:`gmml_corrupt` only applies the blocks, so the
reference and the Triton kernel must agree bit for bit.
"""

from __future__ import annotations

import logging
import math
import threading

import numpy as np
import torch

from ._checks import FLOAT_DTYPES, check_same_device, check_tensor, resolve_backend
from ._types import GMMLBlocks, GMMLOutput

__all__ = ["sample_gmml_blocks", "gmml_corrupt", "gmml_corrupt_reference",
           "paint_block_mask", "gmml_shortfall", "expected_gmml_blocks"]

logger = logging.getLogger(__name__)

# Candidate blocks are drawn this many at a time between host checks of "is every target reachable?".
_CHUNK = 64
# The CPU sampler paints every sample's blocks to find its prefix, and that canvas is exactly the mask
# paint_block_mask would paint again from the returned boxes. It is handed over once: one slot per
# thread holding a copy of the boxes, used only for boxes equal to it in content (and the same image
# size), so boxes changed in any way, or other boxes, are painted afresh. The next sampler call on the
# thread replaces it.
_HANDOVER = threading.local()


def _randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive), drawn from one uniform each.

    The bounds are Python ints, so nothing is copied from the host to the device.
    """
    u = torch.rand(shape, generator=generator, device=device)
    return (low + (u * (high - low + 1)).floor().long()).clamp_max(high)


def _rows_cols(boxes: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-box row and column membership: ``[B, M, H]`` and ``[B, M, W]`` bool."""
    top, left, h, w = (boxes[..., i].long().unsqueeze(-1) for i in range(4))
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    in_rows = (rows >= top) & (rows < top + h)
    in_cols = (cols >= left) & (cols < left + w)
    return in_rows, in_cols


def paint_block_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Union of the boxes as a bool mask ``[B, H, W]``.

    A pixel is covered when some box covers both its row and its column; counting those boxes
    is a batched matmul of the row and column indicators (exact: counts stay far below 2^24).
    """
    # painting box by box is several times faster on a CPU core (eagerly: it runs in NumPy, which
    # torch.compile cannot trace, so compiled code keeps the matmul)
    if boxes.device.type == "cpu" and not torch.compiler.is_compiling():
        painted = _take_painted(boxes, height, width)
        return painted if painted is not None else _paint_sequential(boxes, height, width)
    return _paint_matmul(boxes, height, width)


def _paint_matmul(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    in_rows, in_cols = _rows_cols(boxes, height, width)  # [B, M, H], [B, M, W]
    hits = torch.bmm(in_rows.transpose(1, 2).float(), in_cols.float())  # [B, H, W]
    return hits > 0


def _take_painted(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """The sampler's canvas if these boxes equal the ones it returned (once); else None."""
    slot = getattr(_HANDOVER, "slot", None)
    if slot is None:
        return None
    kept, shape, mask = slot
    if (shape != (height, width) or kept.shape != boxes.shape or kept.dtype != boxes.dtype
            or not torch.equal(kept, boxes)):
        return None
    _HANDOVER.slot = None
    return torch.from_numpy(mask)


def _paint_sequential(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`paint_block_mask` one box at a time, boxes clipped to the image like the matmul's."""
    mask = np.zeros((boxes.shape[0], height, width), dtype=bool)
    for sample, rows in zip(mask, boxes.tolist()):
        for top, left, h, w in rows:
            r0, r1, c0, c1 = max(top, 0), min(top + h, height), max(left, 0), min(left + w, width)
            if r0 < r1 and c0 < c1:
                sample[r0:r1, c0:c1] = True
    return torch.from_numpy(mask)


@torch.no_grad()
def sample_gmml_blocks(
    batch: int,
    height: int,
    width: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    zero_ratio: tuple[float, float] = (0.5, 0.7),
    alien_ratio: float = 0.3,
    alien_prob: float = 0.5,
    max_block_frac: float = 0.3,
    align: int = 1,
    max_rounds: int = 1024,
    allow_self_alien: bool = False,
    budget: int | None = None,
    backend: str | None = None,
) -> GMMLBlocks:
    """Draw GMML blocks for a batch of ``height × width`` spectrograms.

    Each sample is in *alien* mode with probability ``alien_prob`` (target coverage
    ``alien_ratio``) and otherwise in *zeros* mode (target ``U(zero_ratio)``). Blocks are drawn
    until their union reaches the target: top-left corner uniform over the image, height uniform
    in ``[align, max_block_frac·H]`` and width in ``[align, max_block_frac·W]`` (multiples of
    ``align``; corners on the ``align`` grid), clipped at the border. The block that crosses the
    target is kept, so final coverage is ≥ target. Candidates are drawn for the whole batch in
    chunks of 64 per sample; each sample keeps its shortest prefix that reaches the target. On
    a CPU that prefix is found by painting block by block; on CUDA by two Triton kernels (each
    pixel's first covering candidate, then a per-sample histogram of those indices whose running
    sum is the union area of every prefix); elsewhere by a vectorised binary search over union
    areas: the same blocks for the same generator state. ``backend`` (``"reference"``,
    ``"triton"`` or ``"auto"``/None: CUDA → Triton; ``ASIT_OPS_BACKEND`` overrides the default)
    picks the kernels or the PyTorch search; the draws are the same either way.

    The alien source is drawn uniformly from the *other* samples (``allow_self_alien=True``
    reproduces the authors' code, which may pick the sample itself). With ``batch == 1`` there
    is no other sample, so every sample uses zeros mode.

    ``budget=None`` checks on the host after every chunk whether all targets are reached (a
    device sync per chunk, and one more to trim the boxes to the longest prefix). ``budget=n``
    draws exactly ``n`` candidates per sample and never reads anything back: the boxes tensor is
    ``[B, n, 4]`` (slots past each sample's prefix have height 0), and a sample whose ``n``
    blocks do not reach its target keeps all ``n`` (see :func:`gmml_shortfall`; for 592 × 128
    with the default settings the longest prefix seen in 76,800 samples was 117 blocks).
    """
    for name, v in (("batch", batch), ("height", height), ("width", width), ("align", align)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(zero_ratio, (tuple, list)) or len(zero_ratio) != 2:
        raise ValueError(f"zero_ratio must be a (low, high) pair, got {zero_ratio!r}")
    if not isinstance(max_rounds, int) or isinstance(max_rounds, bool) or max_rounds < 1:
        raise ValueError(f"max_rounds must be a positive int, got {max_rounds!r}")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ValueError(f"budget must be a positive int or None, got {budget!r}")
    lo, hi = zero_ratio
    if not (0.0 < lo <= hi <= 1.0):
        raise ValueError(f"zero_ratio must satisfy 0 < low <= high <= 1, got {zero_ratio}")
    if not (0.0 < alien_ratio <= 1.0):
        raise ValueError(f"alien_ratio must be in (0, 1], got {alien_ratio}")
    if not (0.0 <= alien_prob <= 1.0):
        raise ValueError(f"alien_prob must be in [0, 1], got {alien_prob}")
    if not (0.0 < max_block_frac <= 1.0):
        raise ValueError(f"max_block_frac must be in (0, 1], got {max_block_frac}")
    device = torch.device(device) if device is not None else (
        generator.device if generator is not None else torch.device("cpu"))
    use_triton = resolve_backend(backend, device) == "triton"

    alien = torch.rand(batch, generator=generator, device=device) < alien_prob
    if batch == 1:
        alien = torch.zeros_like(alien)
    if allow_self_alien or batch == 1:
        source = _randint(0, batch - 1, (batch,), generator, device)
    else:
        offset = _randint(1, batch - 1, (batch,), generator, device)
        source = (torch.arange(batch, device=device) + offset) % batch
    zero_target = lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)
    target = torch.where(alien, torch.full_like(zero_target, alien_ratio), zero_target)

    # Sizes and corners live on the align grid, counted in cells of `align` pixels.
    cells_h, cells_w = math.ceil(height / align), math.ceil(width / align)
    max_h = max(1, int(max_block_frac * height) // align)
    max_w = max(1, int(max_block_frac * width) // align)
    area = float(height * width)
    need = target * area  # a sample is done once its union covers at least this many pixels

    def draw(n: int) -> torch.Tensor:  # n candidate blocks per sample, [B, n, 4] int64
        top = _randint(0, cells_h - 1, (batch, n), generator, device) * align
        left = _randint(0, cells_w - 1, (batch, n), generator, device) * align
        bh = torch.minimum(_randint(1, max_h, (batch, n), generator, device) * align, height - top)
        bw = torch.minimum(_randint(1, max_w, (batch, n), generator, device) * align, width - left)
        return torch.stack([top, left, bh, bw], dim=-1)

    if budget is not None:  # sync-free: a fixed number of candidates, the prefix found on the device
        candidates = draw(budget)
        count = (_prefix_triton(candidates, need, height, width).clamp_max(budget) if use_triton
                 else _shortest_prefix(candidates, need, height, width))
        return _trim(candidates, count, budget, alien, source, target)

    # Draw candidate blocks in chunks until the union of all of them reaches every target
    # (one host check per chunk), then find each sample's shortest prefix that reaches it.
    # The finders give the same counts from the same draws: the kernels and the vectorised search
    # suit the GPU, the sequential one (a few array operations per block) is ~10x faster on one CPU core.
    finder = _SequentialPrefix(batch, height, width, need) if device.type == "cpu" and not use_triton else None
    candidates = draw(min(_CHUNK, max_rounds))
    while True:
        if finder is not None:
            done = finder.update(candidates)
        elif use_triton:  # counts past the candidates drawn mark the samples still short of their target
            count = _prefix_triton(candidates, need, height, width)
            done = bool((count <= candidates.shape[1]).all())
        else:
            done = bool((_union_area(candidates, None, height, width) >= need).all())
        if done:
            break
        if candidates.shape[1] >= max_rounds:
            logger.warning("sample_gmml_blocks: max_rounds=%d reached before every sample met its target",
                           max_rounds)
            break
        candidates = torch.cat([candidates, draw(min(_CHUNK, max_rounds - candidates.shape[1]))], dim=1)
    if finder is None:
        # [B] blocks each sample uses
        count = (count.clamp_max(candidates.shape[1]) if use_triton
                 else _shortest_prefix(candidates, need, height, width))
        return _trim(candidates, count, max(int(count.max()), 1), alien, source, target)
    count = finder.counts(candidates.shape[1])
    blocks = _trim(candidates, count, max(int(count.max()), 1), alien, source, target)
    # each canvas holds exactly the blocks kept (painting stops at the block that reaches the target)
    _HANDOVER.slot = (blocks.boxes.clone(), (height, width), finder.masks)
    return blocks


def _prefix_triton(candidates: torch.Tensor, need: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The kernels' prefix counts ``[B]`` in ``[1, M + 1]`` (``M + 1``: all ``M`` candidates fall short)."""
    from . import _triton

    return _triton.gmml_prefix_triton(candidates, need, height, width)


def _trim(candidates: torch.Tensor, count: torch.Tensor, last: int, alien: torch.Tensor, source: torch.Tensor,
          target: torch.Tensor) -> GMMLBlocks:
    """Keep the first ``last`` candidate slots; blank (height and width 0) those past each ``count``."""
    boxes = candidates[:, :last]
    unused = torch.arange(last, device=boxes.device) >= count[:, None]  # [B, last]
    boxes = boxes.masked_fill(unused[..., None] & (torch.arange(4, device=boxes.device) >= 2), 0)
    return GMMLBlocks(boxes.to(torch.int32).contiguous(), alien, source, target)


def expected_gmml_blocks(height: int, width: int, target: float, *, max_block_frac: float = 0.3,
                         align: int = 1) -> float:
    """Rough number of blocks a sample needs for their union to cover ``target`` of an
    ``height × width`` image: ``log(1 - target) / log(1 - a)`` with ``a`` the mean block area over the
    image area, as if blocks fell independently and never at the border (clipping makes the real
    number larger: for 592 × 128 and target 0.7 this gives 52, while the sampler's median is 71 and
    its maximum over 1,024 samples 108). For sizing ``budget`` in :func:`sample_gmml_blocks`."""
    max_h = max(1, int(max_block_frac * height) // align)
    max_w = max(1, int(max_block_frac * width) // align)
    area = min(1.0, (1 + max_h) / 2 * align * (1 + max_w) / 2 * align / (height * width))
    if target >= 1.0 or area >= 1.0:
        return math.inf if area < 1.0 else 1.0
    return math.log(1.0 - target) / math.log(1.0 - area)


def gmml_shortfall(mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample, True where the painted ``mask`` (``[B, ..., H, W]`` bool) covers less than its
    ``target`` fraction: only possible when :func:`sample_gmml_blocks` ran out of ``budget`` or
    ``max_rounds``. The same float32 comparison as the sampler's; no host sync."""
    covered = mask.flatten(1).sum(1, dtype=torch.int32).to(torch.float32)
    return covered < target * float(math.prod(mask.shape[1:]))


def _union_area(boxes: torch.Tensor, count: torch.Tensor | None, height: int, width: int) -> torch.Tensor:
    """Pixels covered by the union of each sample's first ``count`` boxes (all when None): ``[B]``.

    Boxes are added to a 2-D difference array whose cumulative sums give, per pixel, how many
    boxes cover it: a few full-image passes whatever the number of boxes.
    """
    b, m, _ = boxes.shape
    top, left, h, w = boxes.long().unbind(-1)  # each [B, M]
    weight = (h > 0) & (w > 0)
    if count is not None:
        weight &= torch.arange(m, device=boxes.device) < count[:, None]
    # per-pixel counts never exceed M, so int16 suffices (its cumsum is ~3x faster on CPU)
    dtype = torch.int16 if m < 2**15 else torch.int32
    weight = weight.to(dtype)
    stride = width + 1
    plane = (height + 1) * stride
    base = torch.arange(b, device=boxes.device)[:, None] * plane
    bottom, right = top + h, left + w
    index = torch.cat([base + top * stride + left, base + top * stride + right,
                       base + bottom * stride + left, base + bottom * stride + right], dim=1)
    value = torch.cat([weight, -weight, -weight, weight], dim=1)
    diff = torch.zeros(b * plane, dtype=dtype, device=boxes.device)
    diff.index_add_(0, index.flatten(), value.flatten())
    hits = diff.view(b, height + 1, stride).cumsum(1, dtype=dtype).cumsum(2, dtype=dtype)
    # boxes end at most at the border, so the extra last row and column are all zero
    return torch.count_nonzero(hits, dim=(1, 2)).float()


class _SequentialPrefix:
    """Shortest covering prefix per sample by painting the blocks one at a time (CPU).

    Each block adds the pixels it newly covers (its area less those already painted) to its
    sample's count, so a block costs its own area, not a full-image pass. ``update`` takes the
    candidates drawn so far, paints the new ones of every unfinished sample, and says whether
    every sample has reached its target; ``counts`` gives the prefix lengths (``M`` if none).
    """

    def __init__(self, batch: int, height: int, width: int, need: torch.Tensor) -> None:
        self.masks = np.zeros((batch, height, width), dtype=bool)
        self.covered = [0] * batch
        # float32 targets compared with exact integer counts, as the vectorised finder compares
        # float32 counts (exact below 2^24) with them
        self.need = need.cpu().tolist()
        self.count: list[int | None] = [None] * batch
        self.seen = 0

    def update(self, candidates: torch.Tensor) -> bool:
        new = candidates[:, self.seen :].tolist()
        for b, rows in enumerate(new):
            if self.count[b] is not None:
                continue
            mask, covered, need = self.masks[b], self.covered[b], self.need[b]
            for k, (top, left, h, w) in enumerate(rows):
                region = mask[top : top + h, left : left + w]
                covered += region.size - int(np.count_nonzero(region))
                region[...] = True
                if covered >= need:
                    self.count[b] = self.seen + k + 1
                    break
            self.covered[b] = covered
        self.seen = candidates.shape[1]
        return all(c is not None for c in self.count)

    def counts(self, m: int) -> torch.Tensor:
        return torch.tensor([m if c is None else c for c in self.count], dtype=torch.long)


def _shortest_prefix(boxes: torch.Tensor, need: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per sample, the smallest ``k`` whose first ``k`` boxes cover ``need`` pixels (``M`` if none does).

    Coverage grows with ``k``, so a vectorised binary search finds it in ``ceil(log2 M)`` passes.
    """
    b, m, _ = boxes.shape
    lo = torch.zeros(b, dtype=torch.long, device=boxes.device)  # coverage(lo) < need
    hi = torch.full((b,), m, dtype=torch.long, device=boxes.device)  # coverage(hi) >= need (or hi = M)
    for _ in range(max(1, math.ceil(math.log2(m + 1)))):
        mid = (lo + hi) // 2
        ok = _union_area(boxes, mid, height, width) >= need
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid)
    return hi


def _check_blocks(x: torch.Tensor, blocks: GMMLBlocks) -> None:
    if not isinstance(blocks, tuple) or len(blocks) != 4:
        raise TypeError("blocks must be a GMMLBlocks (boxes, alien, source, target)")
    boxes, alien, source, _ = blocks
    b = x.shape[0]
    check_tensor("blocks.boxes", boxes, ndim=3, dtypes=(torch.int32, torch.int64))
    if boxes.shape[0] != b or boxes.shape[2] != 4:
        raise ValueError(f"blocks.boxes must have shape [{b}, M, 4], got {tuple(boxes.shape)}")
    check_tensor("blocks.alien", alien, ndim=1, dtypes=(torch.bool,))
    check_tensor("blocks.source", source, ndim=1, dtypes=(torch.int32, torch.int64))
    if alien.shape[0] != b or source.shape[0] != b:
        raise ValueError(f"blocks.alien and blocks.source must have {b} entries (the batch size of x)")
    check_same_device(x=x, **{"blocks.boxes": boxes, "blocks.alien": alien, "blocks.source": source})


def _numpy_select_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64, torch.float16)
            and not x.requires_grad and not torch.compiler.is_compiling())


def _select_numpy(x: torch.Tensor, mask: torch.Tensor, blocks: GMMLBlocks) -> torch.Tensor:
    """``where(mask, fill, x)`` on the CPU with NumPy's masked copy, sample by sample (fill: 0 in zeros
    mode, the source sample in alien mode): the same values, bit for bit, in about a third of the
    time of ``torch.where`` plus the gathered fill copy at 592 × 128."""
    src_x = x.contiguous().numpy()
    out = x.clone(memory_format=torch.contiguous_format)
    dst, keep = out.numpy(), mask.numpy()
    zero = np.zeros((), dtype=src_x.dtype)
    for i, (alien, source) in enumerate(zip(blocks.alien.tolist(), blocks.source.tolist())):
        np.copyto(dst[i], src_x[source] if alien else zero, where=keep[i])
    return out


def gmml_corrupt_reference(x: torch.Tensor, blocks: GMMLBlocks, patch_size: int = 16) -> GMMLOutput:
    """GMML painter without Triton (the CPU path and the oracle for the Triton kernel): PyTorch, with
    the painting and the masked copy in NumPy on a CPU when eager (bit-identical either way)."""
    b, _, h, w = x.shape
    mask = paint_block_mask(blocks.boxes, h, w).unsqueeze(1)  # [B, 1, H, W]
    if _numpy_select_ok(x):
        corrupted = _select_numpy(x, mask, blocks)
    else:
        # zeros-mode samples read from themselves, so their (ignored) source index is never used
        src = torch.where(blocks.alien, blocks.source.long(), torch.arange(b, device=x.device))
        fill = x[src]  # a copy: zeros-mode samples are then zeroed in place
        fill.index_fill_(0, (~blocks.alien).nonzero().flatten(), 0)
        corrupted = torch.where(mask, fill, x)
    if h >= patch_size and w >= patch_size:
        p, ph, pw = patch_size, h // patch_size, w // patch_size
        # a free reinterpretation eagerly; Inductor cannot lower a bool -> uint8 view, so compiled code converts
        m8 = mask.to(torch.uint8) if torch.compiler.is_compiling() else mask.view(torch.uint8)
        tiles = m8[..., : ph * p, : pw * p].reshape(b, ph, p, pw, p)
        # exact integer counts: first over the rows of each tile in uint8 (at most p, if <= 255; adding whole rows
        # vectorises, ~10x faster on a CPU than widening the mask to int32 for one sum), then over its columns
        per_column = tiles.sum(dim=2, dtype=torch.uint8 if p <= 255 else torch.int32)  # [B, ph, pw, p]
        counts = per_column.sum(dim=3, dtype=torch.int32)  # [B, ph, pw]
        # count / p² rounded to nearest float32, as the kernel's div_rn. Divided in float64, then rounded:
        # a float32 division may be a multiplication by the reciprocal (CUDA does that for a CPU scalar,
        # Inductor for a constant), off by an ulp for some counts when p² is not a power of two (p = 10:
        # 30 of the 101 counts); in float64 that error is far below the distance of count / p² from any
        # float32 rounding boundary, so the rounded result is exact on every backend.
        frac = (counts.to(torch.float64) / float(p * p)).to(torch.float32).flatten(1)
    else:
        frac = mask.new_zeros((b, 0), dtype=torch.float32)
    return GMMLOutput(corrupted, mask, frac)


def gmml_corrupt(x: torch.Tensor, blocks: GMMLBlocks, patch_size: int = 16, *,
                 backend: str | None = None) -> GMMLOutput:
    """Apply GMML blocks to a batch of spectrograms.

    Args:
        x: ``[B, C, H, W]`` float tensor (fp32, fp16, bf16 or fp64), the clean views.
        blocks: from :func:`sample_gmml_blocks` (same device as ``x``).
        patch_size: token size ``p`` for the per-token corrupted fraction.
        backend: ``"reference"``, ``"triton"`` or ``"auto"``/None (CUDA → Triton);
            ``ASIT_OPS_BACKEND`` overrides the default.

    Returns:
        :class:`GMMLOutput` ``(corrupted, mask, token_fraction)``: corrupted pixels are 0 in
        zeros mode and ``x[source]`` at the same position in alien mode; the mask is bool
        ``[B, 1, H, W]``; the token fraction is the mask averaged over each ``p × p`` patch,
        ``[B, (H // p) * (W // p)]`` (a partial patch at the border is not a token).
    """
    check_tensor("x", x, ndim=4, dtypes=FLOAT_DTYPES)
    if not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
    _check_blocks(x, blocks)
    # the kernel only moves bits, so it takes every float dtype (fp64 included)
    if resolve_backend(backend, x.device) == "triton":
        from . import _triton

        return _triton.gmml_corrupt_triton(x, blocks, patch_size)
    return gmml_corrupt_reference(x, blocks, patch_size)
