"""GMML sampling kernels (asit_kernels.gmml_sample): first-cover map, prefix counts, and the sampler's boxes.

The kernels must give each sample exactly the prefix the PyTorch binary search (``_shortest_prefix``)
finds, so that ``sample_gmml_blocks`` returns the same boxes on either backend for the same generator.
"""

from __future__ import annotations

import pytest
import torch
from asit_kernels import first_cover_dtype, gmml_prefix, gmml_sample

from asit.ops import sample_gmml_blocks
from asit.ops._triton import gmml_prefix_triton
from asit.ops.gmml import _shortest_prefix, _union_area

H, W = 37, 19


def _first_cover(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Brute force: for every pixel, the smallest index of a box covering it (M if none), int64."""
    b, m, _ = boxes.shape
    top, left, bh, bw = (boxes[..., i].long().cpu()[:, None, None, :] for i in range(4))  # [B, 1, 1, M]
    ys = torch.arange(height)[None, :, None, None]
    xs = torch.arange(width)[None, None, :, None]
    hit = (ys >= top) & (ys < top + bh) & (xs >= left) & (xs < left + bw)  # [B, H, W, M]
    return torch.where(hit, torch.arange(m), m).amin(-1)


def _counts_from_first(first: torch.Tensor, need: torch.Tensor, m: int) -> torch.Tensor:
    """Smallest k whose first k boxes cover ``need`` (M + 1 if none), by painting prefix after prefix."""
    out = []
    for f, n in zip(first, need.cpu()):
        out.append(next((k for k in range(1, m + 1) if (f < k).sum().to(n.dtype) >= n), m + 1))
    return torch.tensor(out)


def _random_boxes(b: int, m: int, device, *, clipped: bool, align: int = 1) -> torch.Tensor:
    """Random boxes with some empty slots; ``clipped``: inside the image (as the sampler draws them)."""
    cells_h, cells_w = -(-H // align), -(-W // align)
    top = torch.randint(0, cells_h, (b, m)) * align
    left = torch.randint(0, cells_w, (b, m)) * align
    bh = torch.randint(1, 12 // align + 1, (b, m)) * align
    bw = torch.randint(1, 8 // align + 1, (b, m)) * align
    if clipped:
        bh, bw = torch.minimum(bh, H - top), torch.minimum(bw, W - left)
    else:
        top, left = top - 4, left - 3
    bh = bh.masked_fill(torch.rand(b, m) < 0.2, 0)  # empty slots, as the sampler's blank tails
    return torch.stack([top, left, bh, bw], -1).to(device)


@pytest.mark.parametrize("m", [7, 40])
@pytest.mark.parametrize("clipped", [True, False])
def test_first_cover_and_counts_brute_force(m, clipped, device, seed, poison):
    b = 4
    boxes = _random_boxes(b, m, device, clipped=clipped).to(torch.int32)
    # targets from nothing to the whole image: some samples reach theirs early, some never
    need = torch.tensor([1.0, 0.3 * H * W, 0.8 * H * W, float(H * W)], device=device)
    count, first = gmml_prefix(boxes, need, H, W, store_first=True)
    ref = _first_cover(boxes, H, W)
    assert first.dtype == first_cover_dtype(m) == torch.int16 and first.shape == (b, H, W)
    assert torch.equal(first.long().cpu(), ref), f"seed={seed}: first-cover map differs"
    assert count.dtype == torch.int64 and count.shape == (b,)
    assert torch.equal(count.cpu(), _counts_from_first(ref, need, m)), f"seed={seed}"
    # without the map, the same counts and an empty placeholder
    count2, empty = gmml_prefix(boxes, need, H, W)
    assert torch.equal(count2, count) and empty.numel() == 0


@pytest.mark.parametrize("m", [7, 40])
@pytest.mark.parametrize("align", [1, 3])
@pytest.mark.parametrize("tile_histogram", [True, False])
def test_counts_equal_shortest_prefix(m, align, tile_histogram, device, seed, poison, monkeypatch):
    """Counts equal the PyTorch search's, with the tile histogram and (as for budgets past
    ``HIST_MAX_BINS``) with one atomic per pixel."""
    if not tile_histogram:
        monkeypatch.setattr(gmml_sample, "HIST_MAX_BINS", 16)
    b = 6
    boxes = _random_boxes(b, m, device, clipped=True, align=align)  # int64, as the sampler's draws
    need = torch.rand(b, device=device) * (H * W)
    need[0] = H * W  # the whole image: only reached if the boxes happen to cover it all
    count = gmml_prefix_triton(boxes, need, H, W)
    short = _union_area(boxes, None, H, W) < need
    assert torch.equal(count > m, short), f"seed={seed}: M + 1 must mark exactly the samples that fall short"
    assert torch.equal(count.clamp_max(m), _shortest_prefix(boxes, need, H, W)), f"seed={seed}"


def test_float64_need_compared_in_float64(device, poison):
    """The count is compared in need's own dtype: 10.5 pixels needs 11, in float32 and float64 alike."""
    boxes = torch.tensor([[[0, 0, 1, 10], [1, 0, 1, 1], [2, 0, 1, 5]]], dtype=torch.int32, device=device)
    for dtype in (torch.float32, torch.float64):
        assert gmml_prefix(boxes, torch.tensor([10.5], dtype=dtype, device=device), H, W)[0].tolist() == [2]
        assert gmml_prefix(boxes, torch.tensor([10.0], dtype=dtype, device=device), H, W)[0].tolist() == [1]
        assert gmml_prefix(boxes, torch.tensor([17.0], dtype=dtype, device=device), H, W)[0].tolist() == [4]


def _same_blocks(a, b, what: str):
    for name, x, y in zip(("boxes", "alien", "source", "target"), a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {name} differs"


@pytest.mark.parametrize("budget", [7, 40])
@pytest.mark.parametrize("align", [1, 3])
def test_sampler_budget_same_boxes(budget, align, device, seed):
    kw = dict(align=align, budget=budget, device=device, max_block_frac=0.4)
    ref = sample_gmml_blocks(5, H, W, generator=torch.Generator(device).manual_seed(seed), backend="reference", **kw)
    out = sample_gmml_blocks(5, H, W, generator=torch.Generator(device).manual_seed(seed), backend="triton", **kw)
    _same_blocks(out, ref, f"seed={seed} budget={budget} align={align}")
    assert out.boxes.shape == (5, budget, 4)


@pytest.mark.parametrize("max_rounds", [1024, 5])
def test_sampler_chunked_same_boxes(max_rounds, device, seed):
    """``budget=None``: the kernels' host check and counts give the same boxes as the other finders
    (``max_rounds=5``: samples stop short of their targets)."""
    kw = dict(device=device, max_block_frac=0.3, max_rounds=max_rounds)
    ref = sample_gmml_blocks(6, H, W, generator=torch.Generator(device).manual_seed(seed), backend="reference", **kw)
    out = sample_gmml_blocks(6, H, W, generator=torch.Generator(device).manual_seed(seed), backend="triton", **kw)
    _same_blocks(out, ref, f"seed={seed} max_rounds={max_rounds}")


def test_opcheck_gmml_prefix(device):
    boxes = _random_boxes(3, 9, device, clipped=True).to(torch.int32)
    need = torch.rand(3, device=device) * (H * W)
    op = torch.ops.asit.gmml_prefix.default
    torch.library.opcheck(op, (boxes, need, H, W, True))
    torch.library.opcheck(op, (boxes, need, H, W, False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the design shape needs a GPU (too slow interpreted)")
def test_design_shape_same_boxes_cuda(seed):
    """64 samples of 592 × 128 with 256 candidates each, as the trainer's sync-free path draws them."""
    kw = dict(device="cuda", budget=256)
    ref = sample_gmml_blocks(64, 592, 128, generator=torch.Generator("cuda").manual_seed(seed),
                             backend="reference", **kw)
    out = sample_gmml_blocks(64, 592, 128, generator=torch.Generator("cuda").manual_seed(seed), **kw)
    _same_blocks(out, ref, f"seed={seed}")
