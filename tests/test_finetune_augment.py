"""asit.finetune.augment: mixup and SpecAugment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asit.finetune import SpecAugment, apply_mixup, sample_mixup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixup_mixes_inputs_and_labels_with_the_same_lambda():
    rng = np.random.default_rng(0)
    B, S, K = 9, 50, 9
    x = torch.randn(B, S, dtype=torch.float64)
    y = torch.eye(K, dtype=torch.float64)[torch.randperm(K)]  # every clip a different class
    lam, partner = sample_mixup(B, alpha=10.0, prob=1.0, rng=rng)
    assert (partner != torch.arange(B)).all()  # a derangement: nobody mixes with itself
    assert sorted(partner.tolist()) == list(range(B))
    xm, ym = apply_mixup(x, y, lam, partner)
    lam64 = lam.double()
    torch.testing.assert_close(xm, lam64[:, None] * x + (1 - lam64[:, None]) * x[partner])
    # the weight of the clip's own class is λ and the partner's 1 - λ: the same λ as the input's
    own, other = y.argmax(1), y[partner].argmax(1)
    torch.testing.assert_close(ym[torch.arange(B), own], lam64)
    torch.testing.assert_close(ym[torch.arange(B), other], 1 - lam64)
    torch.testing.assert_close(ym.sum(1), torch.ones(B, dtype=torch.float64))
    # λ recovered from the inputs equals the label weight
    lam_from_x = ((xm - x[partner]) / (x - x[partner]))[:, 0]
    torch.testing.assert_close(lam_from_x, ym[torch.arange(B), own])
    assert ((lam > 0) & (lam < 1)).all() and (lam - 0.5).abs().max() < 0.45  # Beta(10, 10) is near 0.5


def test_mixup_probability():
    rng = np.random.default_rng(1)
    lam, _ = sample_mixup(4000, alpha=10.0, prob=0.3, rng=rng)
    assert (lam < 1).float().mean().item() == pytest.approx(0.3, abs=0.03)
    lam0, _ = sample_mixup(16, alpha=10.0, prob=0.0, rng=rng)
    x, y = torch.randn(16, 5), torch.rand(16, 3)
    xm, ym = apply_mixup(x, y, lam0, torch.randperm(16))
    assert torch.equal(xm, x) and torch.equal(ym, y)


def _band(mask_1d: torch.Tensor) -> tuple[int, int]:
    """(start, width) of the True run; asserts the run is contiguous."""
    idx = mask_1d.nonzero().flatten()
    if idx.numel() == 0:
        return 0, 0
    assert idx[-1] - idx[0] + 1 == idx.numel(), "mask band not contiguous"
    return int(idx[0]), int(idx.numel())


@pytest.mark.parametrize("freqm, timem", [(10, 20), (0, 7), (5, 0)])
def test_specaugment_masks_one_band_per_axis_within_the_widths(freqm, timem, seed):
    B, T, Fq = 64, 100, 40
    x = torch.rand(B, 1, T, Fq) + 1.0  # never 0, so 0 means masked
    out = SpecAugment(freqm, timem)(x)
    masked = out[:, 0] == 0  # [B, T, F]
    time_rows = masked.all(2)  # [B, T]
    freq_cols = masked.all(1)  # [B, F]
    widths_t, widths_f = [], []
    for b in range(B):
        _, wt = _band(time_rows[b])
        _, wf = _band(freq_cols[b])
        widths_t.append(wt)
        widths_f.append(wf)
        # nothing masked outside the two bands, and the rest untouched
        expected = time_rows[b][:, None] | freq_cols[b][None, :]
        assert torch.equal(masked[b], expected)
        assert torch.equal(out[b, 0][~expected], x[b, 0][~expected])
    assert max(widths_t) < max(timem, 1) and max(widths_f) < max(freqm, 1)
    if timem > 2:
        assert len(set(widths_t)) > 1  # independent per clip
    if freqm > 2:
        assert len(set(widths_f)) > 1
