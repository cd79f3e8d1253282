"""Unit tests for the pure-PyTorch reference ops in ``asit.ops``.

Every expected value is computed here, independently of the code under test: a slow sequential
painter (Python loops over samples and boxes) for GMML, and float64 formulas for the losses and
the centre update. Exactness tests draw fresh random inputs (the seed is printed, so a failure
can be replayed); statistical tests use fixed seeds with loose bounds so they never flake.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asit.ops import (
    GMMLBlocks,
    centered_softmax_cross_entropy,
    gmml_corrupt,
    masked_l1_loss,
    sample_gmml_blocks,
    update_center_,
)


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A developer's ASIT_OPS_BACKEND must not reroute these CPU tests.
    monkeypatch.delenv("ASIT_OPS_BACKEND", raising=False)


@pytest.fixture
def gen() -> torch.Generator:
    seed = random.SystemRandom().randrange(2**31)
    print(f"seed = {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# Independent oracles
# --------------------------------------------------------------------------------------------

def used_boxes(boxes: torch.Tensor, b: int) -> list[list[int]]:
    """The boxes of sample ``b`` that paint something (unused slots have height 0)."""
    return [row for row in boxes[b].tolist() if row[2] > 0 and row[3] > 0]


def paint_slow(boxes: list[list[int]], height: int, width: int) -> torch.Tensor:
    """Sequential painter of one sample: ``mask[top:top+h, left:left+w] = True`` per box."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    for top, left, h, w in boxes:
        if h > 0 and w > 0:
            mask[top:top + h, left:left + w] = True
    return mask


def corrupt_slow(x: torch.Tensor, blocks: GMMLBlocks) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential GMML painter: zeros → 0, alien → the source's clean pixel, elsewhere x."""
    b_, _, h_, w_ = x.shape
    out = x.clone()
    mask = torch.zeros(b_, 1, h_, w_, dtype=torch.bool)
    for b in range(b_):
        alien = bool(blocks.alien[b])
        src = int(blocks.source[b])
        for top, left, h, w in blocks.boxes[b].tolist():
            if h <= 0 or w <= 0:
                continue
            rows, cols = slice(top, top + h), slice(left, left + w)
            mask[b, 0, rows, cols] = True
            if alien:
                out[b, :, rows, cols] = x[src, :, rows, cols]
            else:
                out[b, :, rows, cols] = 0
    return out, mask


def token_fraction_slow(mask: torch.Tensor, p: int) -> torch.Tensor:
    """Mean of the mask over each full p × p patch, row-major; partial border patches dropped."""
    b_, _, h_, w_ = mask.shape
    rows = []
    for b in range(b_):
        vals = []
        for i in range(h_ // p):
            for j in range(w_ // p):
                patch = mask[b, 0, i * p:(i + 1) * p, j * p:(j + 1) * p]
                vals.append(patch.sum().item() / (p * p))
        rows.append(vals)
    return torch.tensor(rows, dtype=torch.float64).reshape(b_, (h_ // p) * (w_ // p))


def softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def log_softmax64(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    zmax = z.max(-1, keepdim=True).values
    return z - zmax - (z - zmax).exp().sum(-1, keepdim=True).log()


def ce_rows64(s, t, c, ts, tt) -> torch.Tensor:
    """-Σ_k softmax((t - c)/τt)_k · log_softmax(s/τs)_k per row, in float64."""
    p = softmax64((t.double() - c.double()) / float(tt))
    return -(p * log_softmax64(s.double() / float(ts))).sum(-1)


def assert_coverage_semantics(blocks: GMMLBlocks, height: int, width: int) -> None:
    """Union-until-target: coverage ≥ target, and without the last used box it is < target."""
    area = height * width
    for b in range(blocks.boxes.shape[0]):
        rows = blocks.boxes[b].tolist()
        n_used = sum(1 for r in rows if r[2] > 0)
        # Used slots form a prefix: a sample stops drawing once it is covered.
        assert all(r[2] > 0 for r in rows[:n_used]) and all(r[2] == 0 for r in rows[n_used:]), rows
        target = float(blocks.target[b])
        count = int(paint_slow(rows[:n_used], height, width).sum())
        # The target is stored in fp32 (0.3 → 0.30000001): allow that rounding, nothing more.
        assert count >= target * area * (1 - 1e-6), (b, count, target * area)
        before = int(paint_slow(rows[:n_used - 1], height, width).sum())
        assert before < target * area, (b, before, target * area, "an extra block was drawn")


def assert_box_bounds(blocks: GMMLBlocks, height: int, width: int, align: int) -> None:
    max_h = max(align, int(0.3 * height))
    max_w = max(align, int(0.3 * width))
    for b in range(blocks.boxes.shape[0]):
        for top, left, h, w in used_boxes(blocks.boxes, b):
            assert 1 <= h <= max_h and 1 <= w <= max_w, (top, left, h, w)
            assert 0 <= top and top + h <= height and 0 <= left and left + w <= width, (top, left, h, w)
            assert top % align == 0 and left % align == 0, (top, left)
            # Sizes are multiples of align unless the border clipped them.
            assert h % align == 0 or top + h == height, (top, h)
            assert w % align == 0 or left + w == width, (left, w)


# --------------------------------------------------------------------------------------------
# sample_gmml_blocks
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 37, 29), (3, 592, 128), (5, 23, 61)])
def test_sample_coverage_union_until_target(gen, shape):
    b, h, w = shape
    blocks = sample_gmml_blocks(b, h, w, generator=gen)
    assert blocks.boxes.dtype == torch.int32 and blocks.boxes.shape[0] == b and blocks.boxes.shape[2] == 4
    assert blocks.alien.dtype == torch.bool and blocks.source.dtype == torch.int64
    assert blocks.target.dtype == torch.float32
    assert_coverage_semantics(blocks, h, w)
    assert_box_bounds(blocks, h, w, align=1)
    # No trailing slot in which nobody drew a block.
    assert int(blocks.boxes[:, -1, 2].max()) > 0


def test_sample_targets_by_mode(gen):
    blocks = sample_gmml_blocks(61, 9, 11, generator=gen)
    zeros = ~blocks.alien
    assert zeros.any() and blocks.alien.any()
    zt = blocks.target[zeros].double()
    assert float(zt.min()) >= 0.5 and float(zt.max()) <= 0.7
    # Distinct draws, not one shared target.
    assert zt.unique().numel() > 1
    at = blocks.target[blocks.alien]
    assert torch.equal(at, torch.full_like(at, 0.3))


def test_sample_custom_ratios(gen):
    blocks = sample_gmml_blocks(9, 13, 17, generator=gen, zero_ratio=(0.2, 0.25), alien_ratio=0.6,
                                alien_prob=0.5)
    zt = blocks.target[~blocks.alien].double()
    assert ((zt >= 0.2) & (zt <= 0.25)).all()
    assert torch.equal(blocks.target[blocks.alien], torch.full_like(blocks.target[blocks.alien], 0.6))
    assert_coverage_semantics(blocks, 13, 17)


@pytest.mark.parametrize("shape", [(5, 592, 128), (4, 67, 45), (3, 10, 40)])
def test_sample_align16(gen, shape):
    b, h, w = shape
    blocks = sample_gmml_blocks(b, h, w, generator=gen, align=16)
    assert_box_bounds(blocks, h, w, align=16)
    assert_coverage_semantics(blocks, h, w)


def test_sample_align16_clipped_at_border():
    # H = 67 is not a multiple of 16: some block in the bottom cell row must be clipped to 3.
    g = torch.Generator().manual_seed(1234)
    clipped = 0
    for _ in range(8):
        blocks = sample_gmml_blocks(4, 67, 45, generator=g, align=16)
        assert_box_bounds(blocks, 67, 45, align=16)
        for b in range(4):
            clipped += sum(1 for top, _, h, _ in used_boxes(blocks.boxes, b) if h % 16 != 0)
    assert clipped > 0


def test_sample_alien_source_never_self_and_uniform():
    b, draws = 5, 400
    g = torch.Generator().manual_seed(7)
    counts = torch.zeros(b, b, dtype=torch.long)
    for _ in range(draws):
        blocks = sample_gmml_blocks(b, 3, 3, generator=g)
        src = blocks.source
        assert ((src >= 0) & (src < b)).all()
        counts[torch.arange(b), src] += 1
    assert int(counts.diagonal().sum()) == 0, counts
    # Each of the b-1 others expected draws/(b-1) = 100 times (sd ≈ 8.7): a loose ±45 band,
    # plus a chi-square over all 20 cells (df = 15; 99.99 % quantile ≈ 44).
    expected = draws / (b - 1)
    off = counts[~torch.eye(b, dtype=torch.bool)].double()
    assert ((off - expected).abs() < 45).all(), counts
    chi2 = float(((off - expected) ** 2 / expected).sum())
    assert chi2 < 60, (chi2, counts)


def test_sample_alien_source_two_samples_swap(gen):
    blocks = sample_gmml_blocks(2, 5, 5, generator=gen)
    assert blocks.source.tolist() == [1, 0]


def test_sample_allow_self_alien_can_pick_itself():
    g = torch.Generator().manual_seed(3)
    self_picks = 0
    for _ in range(50):
        blocks = sample_gmml_blocks(3, 4, 4, generator=g, allow_self_alien=True)
        self_picks += int((blocks.source == torch.arange(3)).sum())
    # 150 draws, P(self) = 1/3 → ≈ 50.
    assert 20 < self_picks < 80


def test_sample_batch_one_is_zeros_mode():
    g = torch.Generator().manual_seed(11)
    for _ in range(30):
        blocks = sample_gmml_blocks(1, 9, 7, generator=g, alien_prob=1.0)
        assert not bool(blocks.alien[0])
        assert 0.5 <= float(blocks.target[0]) <= 0.7
        assert_coverage_semantics(blocks, 9, 7)


def test_sample_same_seed_same_blocks():
    seed = random.SystemRandom().randrange(2**31)
    a = sample_gmml_blocks(6, 23, 19, generator=torch.Generator().manual_seed(seed))
    b = sample_gmml_blocks(6, 23, 19, generator=torch.Generator().manual_seed(seed))
    for name, ta, tb in zip(a._fields, a, b, strict=True):
        assert torch.equal(ta, tb), name
    c = sample_gmml_blocks(6, 23, 19, generator=torch.Generator().manual_seed(seed + 1))
    assert not (c.boxes.shape == a.boxes.shape and torch.equal(c.boxes, a.boxes))


@pytest.mark.parametrize("alien_prob", [0.5, 0.2, 0.0, 1.0])
def test_sample_alien_fraction(alien_prob):
    g = torch.Generator().manual_seed(5)
    n, alien = 0, 0
    for _ in range(40):
        blocks = sample_gmml_blocks(64, 2, 3, generator=g, alien_prob=alien_prob)
        n += 64
        alien += int(blocks.alien.sum())
    sd = math.sqrt(n * alien_prob * (1 - alien_prob))
    assert abs(alien - n * alien_prob) <= 5 * sd + 1e-9, (alien, n)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    b=st.integers(1, 4),
    h=st.integers(1, 24),
    w=st.integers(1, 24),
    align=st.sampled_from([1, 2, 4, 16]),
    alien_prob=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_sample_property(b, h, w, align, alien_prob, seed):
    blocks = sample_gmml_blocks(b, h, w, generator=torch.Generator().manual_seed(seed), align=align,
                                alien_prob=alien_prob)
    assert_coverage_semantics(blocks, h, w)
    assert_box_bounds(blocks, h, w, align)
    if b >= 2:
        assert not (blocks.source == torch.arange(b)).any()


@pytest.mark.parametrize(("shape", "kwargs"), [
    ((9, 592, 128), {}),
    ((5, 67, 45), {"align": 16}),
    ((6, 31, 17), {"zero_ratio": (0.8, 0.9), "max_block_frac": 0.2}),  # several chunks of 64
    ((4, 40, 40), {"zero_ratio": (0.95, 1.0), "max_block_frac": 0.05, "max_rounds": 70}),  # rounds run out
])
def test_sample_cpu_finder_matches_vectorised(monkeypatch, shape, kwargs):
    """On the CPU the shortest covering prefixes are found by painting block by block; the GPU's
    vectorised binary search must give identical blocks from the same generator state."""
    from asit.ops import gmml

    seed = random.SystemRandom().randrange(2**31)
    sequential = sample_gmml_blocks(*shape, generator=torch.Generator().manual_seed(seed), **kwargs)
    monkeypatch.setattr(gmml, "_SequentialPrefix", lambda *args: None)
    vectorised = sample_gmml_blocks(*shape, generator=torch.Generator().manual_seed(seed), **kwargs)
    for name, a, b in zip(sequential._fields, sequential, vectorised, strict=True):
        assert torch.equal(a, b), f"{name} differs (seed {seed})"
    if "max_rounds" in kwargs:  # every slot drawn, some sample still short of its target
        assert sequential.boxes.shape[1] == kwargs["max_rounds"]
    else:
        assert_coverage_semantics(sequential, *shape[1:])


def test_paint_cpu_matches_matmul_on_any_boxes(gen):
    """Boxes partly or wholly outside the image, and empty ones, are clipped the same way."""
    from asit.ops.gmml import _paint_matmul, paint_block_mask

    h, w = 23, 19
    boxes = torch.stack([
        torch.randint(-10, h + 5, (6, 40), generator=gen), torch.randint(-10, w + 5, (6, 40), generator=gen),
        torch.randint(-3, h + 3, (6, 40), generator=gen), torch.randint(-3, w + 3, (6, 40), generator=gen),
    ], dim=-1).to(torch.int32)
    got = paint_block_mask(boxes, h, w)
    assert got.dtype == torch.bool and got.shape == (6, h, w)
    assert torch.equal(got, _paint_matmul(boxes, h, w))
    assert got.any() and not got.all()


def test_sampler_canvas_handed_to_the_painter_once_and_only_for_equal_boxes(gen, monkeypatch):
    """The CPU sampler's canvas is reused for boxes equal to its own; any other boxes are painted afresh."""
    import threading

    from asit.ops import gmml

    painted = []
    real = gmml._paint_sequential
    monkeypatch.setattr(gmml, "_paint_sequential", lambda *a: painted.append(1) or real(*a))
    h, w = 41, 23

    def check(boxes, hh=h, *, fresh: bool):
        before = len(painted)
        assert torch.equal(gmml.paint_block_mask(boxes, hh, w), real(boxes, hh, w))
        assert len(painted) == before + fresh

    blocks = sample_gmml_blocks(5, h, w, generator=gen)
    check(blocks.boxes[:, :1], fresh=True)  # other boxes, same image size: no hand-over
    check(blocks.boxes, h + 1, fresh=True)  # same boxes, other image size
    check(blocks.boxes, fresh=False)  # ... and the slot still serves the sampler's own boxes
    check(blocks.boxes, fresh=True)  # once only
    check(sample_gmml_blocks(5, h, w, generator=gen).boxes.clone(), fresh=False)  # equal content is enough
    first = sample_gmml_blocks(5, h, w, generator=gen)
    sample_gmml_blocks(5, h, w, generator=gen)  # replaces the slot
    check(first.boxes, fresh=True)
    for change in ("in place", "through .data", "through NumPy"):
        blocks = sample_gmml_blocks(5, h, w, generator=gen)
        target = {"in place": blocks.boxes, "through .data": blocks.boxes.data}.get(change)
        if target is None:
            blocks.boxes.numpy()[:, :, 2:] = 1
        else:
            target[:, :, 2:] = 1  # every block becomes one pixel
        check(blocks.boxes, fresh=True)
    blocks = sample_gmml_blocks(5, h, w, generator=gen)
    thread = threading.Thread(target=check, args=(blocks.boxes,), kwargs={"fresh": True})  # its own slot
    thread.start()
    thread.join()
    check(blocks.boxes, fresh=False)
    with torch.inference_mode():
        blocks = sample_gmml_blocks(5, h, w, generator=gen)
        out = gmml_corrupt(torch.randn(5, 1, h, w), blocks, 4)
    check(blocks.boxes, fresh=True)  # used once, by the corruption under inference mode
    assert torch.equal(out.mask[:, 0], real(blocks.boxes, h, w))


def test_reference_corruption_is_differentiable_in_x(gen):
    """With x requiring grad the painter keeps to torch (not NumPy): gradient 1 on kept pixels."""
    x = torch.randn(4, 2, 19, 26, generator=gen, requires_grad=True)
    blocks = sample_gmml_blocks(4, 19, 26, generator=gen, alien_prob=0.0)  # zeros mode
    out = gmml_corrupt(x, blocks, 4, backend="reference")
    out.corrupted.sum().backward()
    assert torch.equal(x.grad, (~out.mask).expand_as(x).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_numpy_select_matches_torch_where_bit_for_bit(gen, dtype):
    """The CPU select (NumPy masked copy) against torch.where, on signed zeros, NaN and ±inf, strided input."""
    from asit.ops import gmml

    b, c, h, w = 5, 2, 19, 26
    x = torch.randn(b, c, h, 2 * w, generator=gen).to(dtype)[..., ::2]  # not contiguous
    x[0, 0, :3, :3] = -0.0
    x[1, 1, 4:6, 4:6] = float("nan")
    x[2, 0, :2] = float("inf")
    x[3, 1, -2:] = -float("inf")
    blocks = sample_gmml_blocks(b, h, w, generator=gen, alien_prob=0.5)
    mask = gmml._paint_sequential(blocks.boxes, h, w).unsqueeze(1)
    src = torch.where(blocks.alien, blocks.source.long(), torch.arange(b))
    fill = x[src]
    fill[~blocks.alien] = 0
    want = torch.where(mask, fill, x)
    got = gmml._select_numpy(x, mask, blocks)
    assert got.is_contiguous() and got.dtype == dtype
    bits = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    assert torch.equal(got.view(bits), want.contiguous().view(bits))


def test_token_fraction_with_patches_over_255_pixels_high():
    """The per-column counts switch from uint8 to int32 when a patch is taller than 255 rows."""
    h, w, p = 300, 260, 260
    boxes = torch.tensor([[[0, 0, 290, 200]], [[10, 5, 1, 1]]], dtype=torch.int32)
    blocks = GMMLBlocks(boxes, torch.tensor([False, False]), torch.tensor([1, 0]), torch.full((2,), 0.5))
    out = gmml_corrupt(torch.ones(2, 1, h, w), blocks, patch_size=p, backend="reference")
    want = torch.tensor([[260 * 200 / p**2], [1 / p**2]], dtype=torch.float64).float()
    assert torch.equal(out.token_fraction, want)


def test_corrupt_reference_traces_without_graph_breaks(gen):
    """The CPU painter runs in NumPy eagerly; under torch.compile the traceable matmul painter is used."""
    x = torch.randn(3, 1, 20, 18, generator=gen)
    blocks = sample_gmml_blocks(3, 20, 18, generator=gen)
    compiled = torch.compile(lambda t, b: gmml_corrupt(t, b, 4, backend="reference"), fullgraph=True,
                             backend="eager")
    for want, got in zip(gmml_corrupt(x, blocks, 4, backend="reference"), compiled(x, blocks), strict=True):
        assert torch.equal(want, got)


# --------------------------------------------------------------------------------------------
# gmml_corrupt
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.parametrize("channels", [1, 2])
def test_corrupt_bit_identical_to_sequential_painter(gen, dtype, channels):
    b, h, w = 7, 37, 29
    x = (torch.randn(b, channels, h, w, generator=gen) * 3 + 1).to(dtype)
    blocks = sample_gmml_blocks(b, h, w, generator=gen)
    x_before = x.clone()
    out = gmml_corrupt(x, blocks, patch_size=16)
    assert torch.equal(x, x_before), "the input must not be modified in place"
    want, want_mask = corrupt_slow(x, blocks)
    assert out.corrupted.dtype == dtype and out.corrupted.shape == x.shape
    assert torch.equal(out.corrupted, want)
    assert out.mask.dtype == torch.bool and out.mask.shape == (b, 1, h, w)
    assert torch.equal(out.mask, want_mask)


def test_corrupt_both_modes_and_alien_pixels_from_source(gen):
    b, c, h, w = 6, 2, 33, 47
    x = torch.randn(b, c, h, w, generator=gen) + 5  # no zeros in the clean input
    boxes = torch.tensor([[[2, 3, 10, 12], [20, 30, 13, 17], [0, 0, 0, 0]]] * b, dtype=torch.int32)
    alien = torch.tensor([True, False, True, False, True, True])
    source = torch.tensor([3, 0, 0, 2, 5, 1])  # sample 4 reads from 5, which is itself alien
    blocks = GMMLBlocks(boxes, alien, source, torch.full((b,), 0.3))
    x_before = x.clone()
    out = gmml_corrupt(x, blocks, patch_size=8)
    assert torch.equal(x, x_before)
    want, want_mask = corrupt_slow(x, blocks)
    assert torch.equal(out.corrupted, want) and torch.equal(out.mask, want_mask)
    m = out.mask[:, 0]
    for i in range(b):
        got = out.corrupted[i][:, m[i]]
        if alien[i]:
            # Clean pixels of the source, even where the source itself is corrupted.
            assert torch.equal(got, x[int(source[i])][:, m[i]])
        else:
            assert (got == 0).all()
        assert torch.equal(out.corrupted[i][:, ~m[i]], x[i][:, ~m[i]])
    assert int(m[0].sum()) == 10 * 12 + 13 * 17


@pytest.mark.parametrize("shape,p", [((5, 1, 37, 29), 16), ((3, 2, 48, 32), 16), ((4, 1, 23, 31), 3),
                                     ((2, 1, 20, 21), 4), ((3, 1, 592, 128), 16), ((2, 1, 7, 40), 8)])
def test_corrupt_token_fraction(gen, shape, p):
    b, c, h, w = shape
    x = torch.randn(shape, generator=gen)
    blocks = sample_gmml_blocks(b, h, w, generator=gen)
    out = gmml_corrupt(x, blocks, patch_size=p)
    want = token_fraction_slow(out.mask, p)
    assert out.token_fraction.dtype == torch.float32
    assert out.token_fraction.shape == (b, (h // p) * (w // p))
    torch.testing.assert_close(out.token_fraction.double(), want, rtol=1e-6, atol=0)
    # Real values, not all zero or all one.
    if want.numel():
        assert 0 < float(want.mean()) < 1


def test_corrupt_token_fraction_row_major_order():
    # One box covering exactly token (row 1, column 2) of a 3 × 4 token grid, p = 4.
    x = torch.randn(1, 1, 13, 17)
    boxes = torch.tensor([[[4, 8, 4, 4]]], dtype=torch.int32)
    out = gmml_corrupt(x, GMMLBlocks(boxes, torch.tensor([False]), torch.tensor([0]), torch.tensor([0.5])),
                       patch_size=4)
    want = torch.zeros(1, 12)
    want[0, 1 * 4 + 2] = 1.0
    assert torch.equal(out.token_fraction, want)


def test_corrupt_image_smaller_than_patch(gen):
    x = torch.randn(2, 1, 5, 40, generator=gen)
    blocks = sample_gmml_blocks(2, 5, 40, generator=gen)
    out = gmml_corrupt(x, blocks, patch_size=16)
    assert out.token_fraction.shape == (2, 0)
    assert torch.equal(out.corrupted, corrupt_slow(x, blocks)[0])


@pytest.mark.parametrize("m", [3, 0])
def test_corrupt_no_boxes_is_identity(gen, m):
    b, c, h, w = 3, 2, 19, 35
    x = torch.randn(b, c, h, w, generator=gen)
    boxes = torch.randint(0, 10, (b, m, 4), generator=gen, dtype=torch.int32)
    boxes[..., 2] = 0  # every height is 0
    blocks = GMMLBlocks(boxes, torch.tensor([True, False, True]), torch.tensor([1, 2, 0]), torch.zeros(b))
    out = gmml_corrupt(x, blocks, patch_size=8)
    assert torch.equal(out.corrupted, x)
    assert not out.mask.any() and out.mask.shape == (b, 1, h, w)
    assert torch.equal(out.token_fraction, torch.zeros(b, (h // 8) * (w // 8)))


def test_corrupt_full_cover(gen):
    x = torch.randn(2, 1, 16, 32, generator=gen)
    boxes = torch.tensor([[[0, 0, 16, 32]], [[0, 0, 16, 32]]], dtype=torch.int32)
    out = gmml_corrupt(x, GMMLBlocks(boxes, torch.tensor([False, True]), torch.tensor([1, 0]), torch.ones(2)),
                       patch_size=16)
    assert torch.equal(out.corrupted[0], torch.zeros_like(x[0]))
    assert torch.equal(out.corrupted[1], x[0])
    assert torch.equal(out.token_fraction, torch.ones(2, 2))


def test_corrupt_int64_boxes_and_int32_source(gen):
    x = torch.randn(3, 1, 21, 18, generator=gen)
    blocks = sample_gmml_blocks(3, 21, 18, generator=gen)
    b64 = blocks._replace(boxes=blocks.boxes.long(), source=blocks.source.int())
    assert torch.equal(gmml_corrupt(x, b64).corrupted, gmml_corrupt(x, blocks).corrupted)


# --------------------------------------------------------------------------------------------
# masked_l1_loss
# --------------------------------------------------------------------------------------------

def masked_l1_64(p, t, m) -> torch.Tensor:
    m = m.double().expand(p.shape)
    return ((p.double() - t.double()).abs() * m).sum() / max(float(m.sum()), 1.0)


@pytest.mark.parametrize("mask_kind", ["bool", "float", "uint8"])
@pytest.mark.parametrize("broadcast", [False, True])
def test_masked_l1_value(gen, mask_kind, broadcast):
    shape = (3, 2, 37, 29)
    p = torch.randn(shape, generator=gen)
    t = torch.randn(shape, generator=gen)
    mshape = (3, 1, 37, 29) if broadcast else shape
    if mask_kind == "float":
        m = torch.rand(mshape, generator=gen) * (torch.rand(mshape, generator=gen) < 0.4)
    else:
        m = torch.rand(mshape, generator=gen) < 0.4
        if mask_kind == "uint8":
            m = m.to(torch.uint8)
    loss = masked_l1_loss(p, t, m)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    want = masked_l1_64(p, t, m)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=0)
    if broadcast and mask_kind == "bool":
        # The denominator counts the broadcast elements: C × Σ mask, not Σ mask.
        num = ((p.double() - t.double()).abs() * m.double()).sum()
        torch.testing.assert_close(loss.double(), num / (2 * m.sum().double()), rtol=1e-5, atol=0)


def test_masked_l1_fp64_stays_fp64(gen):
    p = torch.randn(5, 3, 7, 9, generator=gen, dtype=torch.float64)
    t = torch.randn(5, 3, 7, 9, generator=gen, dtype=torch.float64)
    m = torch.rand(5, 1, 7, 9, generator=gen) < 0.3
    loss = masked_l1_loss(p, t, m)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, masked_l1_64(p, t, m), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_l1_empty_mask_is_zero(gen, dtype):
    p = torch.randn(2, 1, 5, 7, generator=gen).to(dtype).requires_grad_()
    t = torch.randn(2, 1, 5, 7, generator=gen).to(dtype)
    loss = masked_l1_loss(p, t, torch.zeros(2, 1, 5, 7, dtype=torch.bool))
    assert not torch.isnan(loss) and float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(p.grad, torch.zeros_like(p))


def test_masked_l1_full_mask_is_mean_abs(gen):
    p = torch.randn(3, 2, 11, 13, generator=gen)
    t = torch.randn(3, 2, 11, 13, generator=gen)
    loss = masked_l1_loss(p, t, torch.ones(3, 1, 11, 13, dtype=torch.bool))
    torch.testing.assert_close(loss.double(), (p.double() - t.double()).abs().mean(), rtol=1e-5, atol=0)


def test_masked_l1_small_float_mask_clamps_denominator(gen):
    p = torch.randn(2, 1, 5, 5, generator=gen)
    t = torch.randn(2, 1, 5, 5, generator=gen)
    m = torch.zeros(2, 1, 5, 5)
    m[0, 0, 1, 2] = 0.25  # Σ m = 0.25 < 1 → denominator 1
    loss = masked_l1_loss(p, t, m)
    torch.testing.assert_close(loss.double(), 0.25 * (p[0, 0, 1, 2] - t[0, 0, 1, 2]).abs().double(),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_l1_low_precision_accumulates_in_fp32(gen, dtype):
    # 65 k elements: a bf16/fp16 accumulator would be off by far more than 1e-4.
    shape = (3, 5, 67, 65)
    p = (torch.randn(shape, generator=gen) * 4).to(dtype)
    t = torch.randn(shape, generator=gen).to(dtype)
    m = torch.rand(3, 1, 67, 65, generator=gen) < 0.6
    loss = masked_l1_loss(p, t, m)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), masked_l1_64(p, t, m), rtol=1e-4, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_l1_gradient(gen, dtype, mask_kind):
    shape = (3, 2, 17, 23)
    p = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    t = torch.randn(shape, generator=gen).to(dtype)
    m = torch.rand(3, 1, 17, 23, generator=gen) < 0.5
    if mask_kind == "float":
        m = m * torch.rand(3, 1, 17, 23, generator=gen) * 2
    upstream = 0.37
    (masked_l1_loss(p, t, m) * upstream).backward()
    mb = m.double().expand(shape)
    den = max(float(mb.sum()), 1.0)
    want = torch.sign(p.detach().double() - t.double()) * mb / den * upstream
    assert p.grad.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(p.grad.double(), want, rtol=tol, atol=0)
    assert float(p.grad.abs().max()) > 0


def test_masked_l1_other_shapes(gen):
    # The loss is not restricted to 4-D: [N, D] with a [N, 1] mask.
    p = torch.randn(31, 7, generator=gen)
    t = torch.randn(31, 7, generator=gen)
    m = torch.rand(31, 1, generator=gen) < 0.5
    torch.testing.assert_close(masked_l1_loss(p, t, m).double(), masked_l1_64(p, t, m), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------
# centered_softmax_cross_entropy
# --------------------------------------------------------------------------------------------

def ce_inputs(gen, n, k, dtype=torch.float32):
    s = (torch.randn(n, k, generator=gen) * 2).to(dtype)
    t = (torch.randn(n, k, generator=gen) * 2 + 0.5).to(dtype)
    c = torch.randn(k, generator=gen) * 0.5
    return s, t, c


@pytest.mark.parametrize("k", [1000, 1023, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ce_value(gen, k, dtype):
    n, ts, tt = 37, 0.1, 0.04
    s, t, c = ce_inputs(gen, n, k, dtype)
    rows = ce_rows64(s, t, c, ts, tt)
    out = centered_softmax_cross_entropy(s, t, c, ts, tt)
    assert out.loss.dim() == 0 and out.loss.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out.loss.double(), rows.mean(), rtol=tol, atol=0)
    per_row = centered_softmax_cross_entropy(s, t, c, ts, tt, reduction="none").loss
    assert per_row.shape == (n,)
    if dtype == torch.float64:
        torch.testing.assert_close(per_row.double(), rows, rtol=tol, atol=tol / 10)
    else:
        # fp32 rounds each logit / τ (O(100) here) and the sharpened teacher's probabilities, so a row's error
        # is absolute, about eps32 · max|s / τs|, whatever its loss (rows near 1e-8 included, and a
        # cancellation can put a large row past a relative 1e-5): measured at most 50 · eps32 · max|s / τs|
        # over 6,000 seeds × 37 rows for each k; the bound allows 128 (≈ 1e-3 at |s / τs| = 80).
        bound = 128 * torch.finfo(torch.float32).eps * (s.double() / ts).abs().amax(-1)
        err = (per_row.double() - rows).abs()
        assert (err <= bound).all(), f"per-row error {err.max():.3g} over the fp32 bound {bound.min():.3g}"
    # teacher_sum = column sums of the raw (uncentred) teacher logits, fp32.
    assert out.teacher_sum.dtype == torch.float32 and out.teacher_sum.shape == (k,)
    torch.testing.assert_close(out.teacher_sum.double(), t.double().sum(0), rtol=1e-5, atol=1e-4)


def test_ce_bf16_inputs(gen):
    n, k = 29, 1023
    s, t, c = ce_inputs(gen, n, k, torch.bfloat16)
    out = centered_softmax_cross_entropy(s, t, c, 0.1, 0.07, reduction="none")
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss.double(), ce_rows64(s, t, c, 0.1, 0.07), rtol=1e-4, atol=1e-5)


def test_ce_weighted(gen):
    n, k = 41, 1000
    s, t, c = ce_inputs(gen, n, k)
    w = torch.rand(n, generator=gen)
    w[::3] = 0
    rows = ce_rows64(s, t, c, 0.1, 0.05)
    out = centered_softmax_cross_entropy(s, t, c, 0.1, 0.05, w)
    torch.testing.assert_close(out.loss.double(), (w.double() * rows).sum() / w.double().sum(),
                               rtol=1e-5, atol=0)
    none = centered_softmax_cross_entropy(s, t, c, 0.1, 0.05, w, reduction="none").loss
    torch.testing.assert_close(none.double(), w.double() * rows, rtol=1e-5, atol=1e-9)


def test_ce_all_zero_weights_give_zero(gen):
    s, t, c = ce_inputs(gen, 9, 33)
    s.requires_grad_()
    out = centered_softmax_cross_entropy(s, t, c, 0.1, 0.04, torch.zeros(9))
    assert not torch.isnan(out.loss) and float(out.loss.detach()) == 0.0
    out.loss.backward()
    assert torch.isfinite(s.grad).all() and float(s.grad.abs().max()) == 0.0


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("k", [1023, 5])
def test_ce_gradient(gen, weighted, k):
    n, ts, tt = 19, 0.1, 0.04
    s, t, c = ce_inputs(gen, n, k)
    s.requires_grad_()
    t.requires_grad_()
    w = torch.rand(n, generator=gen) if weighted else None
    upstream = -1.7
    out = centered_softmax_cross_entropy(s, t, c, ts, tt, w)
    (out.loss * upstream).backward()
    row_grad = (softmax64(s.detach() / ts) - softmax64((t.detach().double() - c.double()) / tt)) / ts
    scale = (w.double() / w.double().sum())[:, None] if weighted else 1.0 / n
    want = row_grad * scale * upstream
    # the gradient is a difference of fp32 probabilities (up to 1): allow a few of their ulps, scaled
    atol = 8 * torch.finfo(torch.float32).eps * abs(upstream) * float(torch.as_tensor(scale).max()) / ts
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-4, atol=atol)
    assert t.grad is None, "the teacher must not receive a gradient"


def test_ce_gradient_reduction_none(gen):
    n, k, ts, tt = 11, 257, 0.2, 0.06
    s, t, c = ce_inputs(gen, n, k)
    s.requires_grad_()
    up = torch.randn(n, generator=gen)
    centered_softmax_cross_entropy(s, t, c, ts, tt, reduction="none").loss.backward(up)
    want = (softmax64(s.detach() / ts) - softmax64((t.double() - c.double()) / tt)) / ts
    want = want * up.double()[:, None]
    torch.testing.assert_close(s.grad.double(), want, rtol=1e-4, atol=1e-7)


def test_ce_tensor_temperatures_match_floats(gen):
    s, t, c = ce_inputs(gen, 13, 1023)
    ref = centered_softmax_cross_entropy(s, t, c, 0.1, 0.04, reduction="none").loss
    for make in (lambda v: torch.tensor(v), lambda v: torch.tensor(v, dtype=torch.float64),
                 lambda v: torch.tensor([v])):
        got = centered_softmax_cross_entropy(s, t, c, make(0.1), make(0.04), reduction="none").loss
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_ce_center_shifts_teacher_only(gen):
    # A constant centre does not change the softmax; a non-constant one does (here one that pushes
    # every row's top teacher class below all others, so each row's sharp teacher moves elsewhere).
    s, t, _ = ce_inputs(gen, 7, 64)
    a = centered_softmax_cross_entropy(s, t, torch.zeros(64), 0.1, 0.04).loss
    b = centered_softmax_cross_entropy(s, t, torch.full((64,), 3.0), 0.1, 0.04).loss
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    push = torch.zeros(64)
    push[t.argmax(-1)] = 2.0 + 2 * float(t.abs().max())
    d = centered_softmax_cross_entropy(s, t, push, 0.1, 0.04).loss
    want = -(softmax64((t.double() - push.double()) / 0.04) * torch.log_softmax(s.double() / 0.1, -1)).sum(-1)
    torch.testing.assert_close(d.double(), want.mean(), rtol=1e-5, atol=0)
    assert abs(float(d) - float(a)) > 1e-3


def test_ce_center_2d_accepted(gen):
    s, t, c = ce_inputs(gen, 5, 31)
    a = centered_softmax_cross_entropy(s, t, c, 0.1, 0.04).loss
    b = centered_softmax_cross_entropy(s, t, c[None], 0.1, 0.04).loss
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# update_center_
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("momentum", [0.9, 0.37])
@pytest.mark.parametrize("count_kind", ["int", "tensor"])
def test_center_update_formula(gen, momentum, count_kind):
    k, n = 1023, 53
    center = torch.randn(k, generator=gen)
    t = torch.randn(n, k, generator=gen) * 2
    tsum = t.sum(0)
    c0 = center.clone()
    count = n if count_kind == "int" else torch.tensor(n)
    ret = update_center_(center, tsum, count, momentum)
    assert ret is center
    want = momentum * c0.double() + (1 - momentum) * t.double().sum(0) / n
    torch.testing.assert_close(center.double(), want, rtol=1e-5, atol=1e-6)


def test_center_update_two_ranks(gen):
    k, n1, n2, m = 257, 13, 29, 0.9
    t1 = torch.randn(n1, k, generator=gen)
    t2 = torch.randn(n2, k, generator=gen) + 1.0
    other = torch.cat([t2.sum(0), torch.tensor([float(n2)])])
    calls = []

    def fake_all_reduce(buf: torch.Tensor) -> None:  # rank 0's view of a 2-rank SUM
        calls.append(buf.shape)
        buf.add_(other)

    center = torch.randn(k, generator=gen)
    c0 = center.clone()
    update_center_(center, t1.sum(0), n1, m, all_reduce=fake_all_reduce)
    assert calls == [torch.Size([k + 1])], "sum and count must travel in one collective"
    want = m * c0.double() + (1 - m) * torch.cat([t1, t2]).double().mean(0)
    torch.testing.assert_close(center.double(), want, rtol=1e-5, atol=1e-6)


def test_center_update_all_reduce_true_without_group(gen):
    center = torch.randn(17, generator=gen)
    tsum = torch.randn(17, generator=gen)
    a = update_center_(center.clone(), tsum, 4, 0.8, all_reduce=True)
    b = update_center_(center.clone(), tsum, 4, 0.8)
    assert torch.equal(a, b)


def test_center_update_momentum_limits(gen):
    k, n = 99, 11
    t = torch.randn(n, k, generator=gen)
    center = torch.randn(k, generator=gen)
    c0 = center.clone()
    update_center_(center, t.sum(0), n, 1.0)
    assert torch.equal(center, c0)
    update_center_(center, t.sum(0), n, 0.0)
    torch.testing.assert_close(center.double(), t.double().mean(0), rtol=1e-5, atol=1e-6)


def test_center_update_fp64_and_zero_count(gen):
    center = torch.randn(8, generator=gen, dtype=torch.float64)
    c0 = center.clone()
    update_center_(center, torch.zeros(8), 0, 0.5)  # no rows: the mean is 0, not NaN
    assert torch.isfinite(center).all()
    torch.testing.assert_close(center, 0.5 * c0, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

def _blocks(b=2, m=3):
    return GMMLBlocks(torch.zeros(b, m, 4, dtype=torch.int32), torch.zeros(b, dtype=torch.bool),
                      torch.zeros(b, dtype=torch.long), torch.zeros(b))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(x=torch.zeros(2, 8, 8)), ValueError, r"^x "),
    (dict(x=torch.zeros(1, 2, 1, 8, 8)), ValueError, r"^x "),
    (dict(x=torch.zeros(2, 1, 8, 8, dtype=torch.int32)), TypeError, r"^x "),
    (dict(x=[[0.0]]), TypeError, r"^x "),
    (dict(blocks=_blocks(3)), ValueError, "blocks.boxes"),
    (dict(blocks=_blocks()._replace(boxes=torch.zeros(2, 3, 5, dtype=torch.int32))), ValueError,
     "blocks.boxes"),
    (dict(blocks=_blocks()._replace(boxes=torch.zeros(2, 3, 4))), TypeError, "blocks.boxes"),
    (dict(blocks=_blocks()._replace(boxes=torch.zeros(2, 4, dtype=torch.int32))), ValueError, "blocks.boxes"),
    (dict(blocks=_blocks()._replace(alien=torch.zeros(3, dtype=torch.bool))), ValueError, "blocks.alien"),
    (dict(blocks=_blocks()._replace(alien=torch.zeros(2))), TypeError, "blocks.alien"),
    (dict(blocks=_blocks()._replace(source=torch.zeros(2))), TypeError, "blocks.source"),
    (dict(blocks=_blocks()._replace(source=torch.zeros(3, dtype=torch.long))), ValueError, "blocks.source"),
    (dict(blocks=(1, 2)), TypeError, "blocks"),
    (dict(patch_size=0), ValueError, "patch_size"),
    (dict(patch_size=2.0), ValueError, "patch_size"),
    (dict(backend="bogus"), ValueError, "backend"),
])
def test_validation_gmml_corrupt(kwargs, exc, match):
    args = dict(x=torch.zeros(2, 1, 8, 8), blocks=_blocks(), patch_size=4)
    args.update(kwargs)
    backend = args.pop("backend", None)
    with pytest.raises(exc, match=match):
        gmml_corrupt(args["x"], args["blocks"], args["patch_size"], backend=backend)


def test_validation_backend_env(monkeypatch):
    monkeypatch.setenv("ASIT_OPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend"):
        masked_l1_loss(torch.zeros(3), torch.zeros(3), torch.ones(3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(zero_ratio=(0.7, 0.5)), "zero_ratio"),
    (dict(zero_ratio=(0.0, 0.5)), "zero_ratio"),
    (dict(zero_ratio=(0.5, 1.5)), "zero_ratio"),
    (dict(zero_ratio=(float("nan"), 0.5)), "zero_ratio"),
    (dict(batch=0), "batch"),
    (dict(height=-1), "height"),
    (dict(width=0), "width"),
    (dict(width=4.0), "width"),
    (dict(align=0), "align"),
    (dict(alien_ratio=0.0), "alien_ratio"),
    (dict(alien_ratio=1.5), "alien_ratio"),
    (dict(alien_prob=1.5), "alien_prob"),
    (dict(alien_prob=-0.1), "alien_prob"),
    (dict(max_block_frac=0.0), "max_block_frac"),
    (dict(max_block_frac=float("nan")), "max_block_frac"),
])
def test_validation_sample(kwargs, match):
    args = dict(batch=2, height=8, width=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        sample_gmml_blocks(args.pop("batch"), args.pop("height"), args.pop("width"), **args)


@pytest.mark.parametrize("zero_ratio", [(0.5,), (0.5, 0.6, 0.7), 0.6])
def test_validation_sample_zero_ratio_malformed(zero_ratio):
    with pytest.raises((ValueError, TypeError), match="zero_ratio"):
        sample_gmml_blocks(2, 8, 8, zero_ratio=zero_ratio)


def test_validation_sample_max_rounds():
    with pytest.raises(ValueError, match="max_rounds"):
        sample_gmml_blocks(2, 8, 8, max_rounds=0)


_P = torch.zeros(2, 3, 4, 5)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((_P.int(), _P.int(), torch.ones(2, 1, 4, 5)), {}, TypeError, "pred"),
    (([0.0], _P, torch.ones(1)), {}, TypeError, "pred"),
    ((_P, torch.zeros(2, 3, 4, 6), torch.ones(1)), {}, ValueError, "target"),
    ((_P, _P.int(), torch.ones(1)), {}, TypeError, "target"),
    ((_P, _P, torch.ones(2, 1, 4, 5, dtype=torch.int32)), {}, TypeError, "mask"),
    ((_P, _P, torch.ones(2, 2, 4, 5)), {}, ValueError, "mask"),
    ((_P, _P, torch.ones(3, 2, 3, 4, 5)), {}, ValueError, "mask"),
    ((_P, _P, torch.ones(1, 2, 3, 4, 5)), {}, ValueError, "mask"),
    ((_P, _P, torch.ones(2, 1, 4, 5)), dict(backend="bogus"), ValueError, "backend"),
])
def test_validation_masked_l1(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        masked_l1_loss(*args, **kwargs)


@pytest.mark.parametrize("pred_dtype,target_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float64),
                                                     (torch.float16, torch.bfloat16)])
def test_masked_l1_reference_mixed_dtypes(pred_dtype, target_dtype):
    """pred and target may differ in dtype: each is read in its own (an fp32 target is not rounded to
    the prediction's bf16), accumulated in fp32, or fp64 when either is fp64."""
    pred = torch.randn(2, 1, 7, 9).to(pred_dtype)
    target = torch.randn(2, 1, 7, 9).to(target_dtype)
    mask = torch.rand(2, 1, 7, 9) < 0.5
    out = masked_l1_loss(pred, target, mask)
    assert out.dtype == (torch.float64 if torch.float64 in (pred_dtype, target_dtype) else torch.float32)
    ref = ((pred.double() - target.double()).abs() * mask).sum() / mask.sum().clamp_min(1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-7)


def test_validation_masked_l1_mask_larger_than_pred():
    pred = torch.zeros(2, 1, 4, 5)
    with pytest.raises(ValueError, match="mask"):
        masked_l1_loss(pred, pred, torch.ones(2, 3, 4, 5, dtype=torch.bool))


_S = torch.zeros(3, 6)
_C = torch.zeros(6)
_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.zeros(6), torch.zeros(6), _C, 0.1, 0.04), {}, ValueError, "student"),
    ((torch.zeros(1, 3, 6), torch.zeros(1, 3, 6), _C, 0.1, 0.04), {}, ValueError, "student"),
    ((_S, torch.zeros(3, 6, 1), _C, 0.1, 0.04), {}, ValueError, "teacher"),
    ((_S, torch.zeros(4, 6), _C, 0.1, 0.04), {}, ValueError, "teacher"),
    ((_S.int(), _S.int(), _C, 0.1, 0.04), {}, TypeError, "student"),
    ((_S, _S.long(), _C, 0.1, 0.04), {}, TypeError, "teacher"),
    ((_S, _S.double(), _C, 0.1, 0.04), {}, TypeError, "teacher"),
    ((_S, _S, torch.zeros(5), 0.1, 0.04), {}, ValueError, "center"),
    ((_S, _S, torch.zeros(7), 0.1, 0.04), {}, ValueError, "center"),
    ((_S, _S, _C.int(), 0.1, 0.04), {}, TypeError, "center"),
    ((_S, _S, torch.zeros(1, 1, 6), 0.1, 0.04), {}, ValueError, "center"),
    ((_S, _S, _C, 0.0, 0.04), {}, ValueError, "student_temp"),
    ((_S, _S, _C, -0.1, 0.04), {}, ValueError, "student_temp"),
    ((_S, _S, _C, _NAN, 0.04), {}, ValueError, "student_temp"),
    ((_S, _S, _C, _INF, 0.04), {}, ValueError, "student_temp"),
    ((_S, _S, _C, "0.1", 0.04), {}, TypeError, "student_temp"),
    ((_S, _S, _C, 0.1, 0.0), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, -0.04), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, _NAN), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, _INF), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, -_INF), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, torch.tensor([0.04, 0.05])), {}, ValueError, "teacher_temp"),
    ((_S, _S, _C, 0.1, True), {}, TypeError, "teacher_temp"),
    ((_S, _S, _C, 0.1, 0.04, torch.ones(4)), {}, ValueError, "weights"),
    ((_S, _S, _C, 0.1, 0.04, torch.ones(3, 1)), {}, ValueError, "weights"),
    ((_S, _S, _C, 0.1, 0.04, torch.ones(3, dtype=torch.long)), {}, TypeError, "weights"),
    ((_S, _S, _C, 0.1, 0.04), dict(reduction="sum"), ValueError, "reduction"),
    ((_S, _S, _C, 0.1, 0.04), dict(backend="bogus"), ValueError, "backend"),
])
def test_validation_ce(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        centered_softmax_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((torch.zeros(2, 6), torch.zeros(6), 3, 0.9), {}, ValueError, "center"),
    ((torch.zeros(6, dtype=torch.int32), torch.zeros(6), 3, 0.9), {}, TypeError, "center"),
    ((torch.zeros(6, dtype=torch.bfloat16), torch.zeros(6), 3, 0.9), {}, TypeError, "center"),
    ((torch.zeros(6), torch.zeros(7), 3, 0.9), {}, ValueError, "teacher_sum"),
    ((torch.zeros(6), torch.zeros(1, 6), 3, 0.9), {}, ValueError, "teacher_sum"),
    ((torch.zeros(6), torch.zeros(6, dtype=torch.long), 3, 0.9), {}, TypeError, "teacher_sum"),
    ((torch.zeros(6), torch.zeros(6), 3, 1.5), {}, ValueError, "momentum"),
    ((torch.zeros(6), torch.zeros(6), 3, -0.1), {}, ValueError, "momentum"),
    ((torch.zeros(6), torch.zeros(6), 3, _NAN), {}, ValueError, "momentum"),
    ((torch.zeros(6), torch.zeros(6), 3, True), {}, ValueError, "momentum"),
    ((torch.zeros(6), torch.zeros(6), 3, 0.9), dict(all_reduce="yes"), TypeError, "all_reduce"),
])
def test_validation_center(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        update_center_(*args, **kwargs)
