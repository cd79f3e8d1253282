"""GMML painter kernel (asit_kernels.gmml): bit-identical to a sequential painter and the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asit.ops import GMMLBlocks, gmml_corrupt, gmml_corrupt_reference, sample_gmml_blocks


def _sequential(x: torch.Tensor, blocks: GMMLBlocks, p: int):
    """Slow oracle: paint box after box per sample, count each patch's pixels in Python."""
    b, _, h, w = x.shape
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool)
    for i in range(b):
        for top, left, bh, bw in blocks.boxes[i].tolist():
            if bh > 0 and bw > 0:
                mask[i, 0, max(top, 0):max(top + bh, 0), max(left, 0):max(left + bw, 0)] = True
    out = x.detach().cpu().clone()
    for i in range(b):
        fill = x[int(blocks.source[i])].cpu() if bool(blocks.alien[i]) else torch.zeros_like(out[i])
        out[i] = torch.where(mask[i], fill, out[i])
    th, tw = h // p, w // p
    frac = torch.zeros(b, th * tw, dtype=torch.float32)
    for i in range(b):
        for ty in range(th):
            for tx in range(tw):
                count = int(mask[i, 0, ty * p:(ty + 1) * p, tx * p:(tx + 1) * p].sum())
                frac[i, ty * tw + tx] = torch.tensor(count, dtype=torch.float32) / (p * p)
    return out, mask, frac


def _check(x, blocks, p, seed):
    out = gmml_corrupt(x, blocks, p, backend="triton")
    ref = gmml_corrupt_reference(x, blocks, p)
    seq = _sequential(x, blocks, p)
    assert out.mask.view(torch.uint8).max() <= 1, f"seed={seed}: mask holds non-bool bytes"
    for name, a, r, s in zip(("corrupted", "mask", "token_fraction"), out, ref, seq):
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert torch.equal(a, r), f"seed={seed}: {name} differs from the reference"
        assert torch.equal(a.cpu(), s), f"seed={seed}: {name} differs from the sequential painter"
    return out


@pytest.mark.parametrize("b,c,h,w,p", [(3, 1, 37, 29, 16), (2, 2, 50, 33, 10), (2, 1, 20, 21, 3),
                                       (2, 1, 7, 9, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sampled_blocks_bit_identical(b, c, h, w, p, dtype, device, seed, poison):
    x = torch.randn(b, c, h, w, device=device).to(dtype)
    blocks = sample_gmml_blocks(b, h, w, device=device, max_block_frac=0.6, alien_prob=0.5)
    _check(x, blocks, p, seed)


def _boxes(rows, device):
    return torch.tensor(rows, dtype=torch.int32, device=device)


@pytest.mark.parametrize("kind", ["empty", "full", "all_alien"])
def test_edge_masks(kind, device, seed, poison):
    b, h, w, p = 3, 19, 17, 8
    x = torch.randn(b, 1, h, w, device=device)
    if kind == "empty":
        boxes = _boxes([[[0, 0, 0, 5]], [[3, 3, 0, 0]], [[1, 1, 0, 9]]], device)
    else:
        boxes = _boxes([[[0, 0, h, w]], [[0, 0, h, w]], [[-2, -3, h + 9, w + 9]]], device)
    alien = torch.full((b,), kind == "all_alien", device=device)
    source = torch.tensor([1, 2, 0], device=device)
    out = _check(x, GMMLBlocks(boxes, alien, source, torch.zeros(b, device=device)), p, seed)
    if kind == "empty":
        assert not out.mask.any() and torch.equal(out.corrupted, x)
        assert (out.token_fraction == 0).all()
    else:
        assert out.mask.all() and (out.token_fraction == 1).all()
        expect = x[source] if kind == "all_alien" else torch.zeros_like(x)
        assert torch.equal(out.corrupted, expect)


def test_noncontiguous_input_int64_boxes(device, seed, poison):
    x = torch.randn(2, 1, 40, 26, device=device).transpose(2, 3)  # [2, 1, 26, 40], strided
    blocks = sample_gmml_blocks(2, 26, 40, device=device, max_block_frac=0.6, alien_prob=1.0)
    blocks = blocks._replace(boxes=blocks.boxes.long())
    _check(x, blocks, 8, seed)


def test_forward_only_detaches(device):
    x = torch.randn(2, 1, 8, 8, device=device, requires_grad=True)
    blocks = sample_gmml_blocks(2, 8, 8, device=device)
    out = gmml_corrupt(x, blocks, 4, backend="triton")
    assert not out.corrupted.requires_grad


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), p=st.integers(1, 5), n_boxes=st.integers(1, 4),
       data=st.data())
def test_random_boxes_property(h, w, p, n_boxes, data):
    """Any boxes (overlapping, clipped, empty) paint exactly like the sequential painter."""
    coord = st.tuples(st.integers(0, h), st.integers(0, w), st.integers(0, h), st.integers(0, w))
    rows = [data.draw(st.lists(coord, min_size=n_boxes, max_size=n_boxes)) for _ in range(2)]
    alien = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2, max_size=2)))
    x = torch.randn(2, 1, h, w)
    blocks = GMMLBlocks(torch.tensor(rows, dtype=torch.int32), alien, torch.tensor([1, 0]), torch.zeros(2))
    _check(x, blocks, p, seed="hypothesis")


def test_budget_blocks_with_blank_tails_bit_identical(device, seed, poison):
    """Sync-free sampling leaves most slots blank after each sample's prefix; the kernel stops at each
    sample's last non-empty box and must still paint exactly like the reference (one sample here has
    an empty box in the middle, and one has no box at all)."""
    blocks = sample_gmml_blocks(5, 37, 23, device=device, budget=48, max_block_frac=0.5)
    boxes = blocks.boxes.clone()
    boxes[1, 0, 2] = 0  # an empty box before non-empty ones
    boxes[2, :, 2:] = 0  # a sample without any box
    x = torch.randn(5, 2, 37, 23, device=device)
    _check(x, blocks._replace(boxes=boxes), 8, seed)
