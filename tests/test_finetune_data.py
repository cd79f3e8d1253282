"""asit.finetune.data: balanced weights, the weighted DDP sampler, training crops and evaluation windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asit.data import AudioEntry
from asit.finetune import WeightedDistributedSampler, balanced_sample_weights

pytestmark = pytest.mark.usefixtures("one_thread")


def test_balanced_weights_are_sums_of_inverse_label_counts():
    rng = np.random.default_rng(2)
    targets = (rng.random((40, 7)) < 0.25).astype(np.float32)
    targets[0] = 0  # an unlabelled clip
    w = balanced_sample_weights(targets)
    counts = targets.sum(0)
    for i in range(40):
        assert w[i] == pytest.approx(sum(1.0 / counts[k] for k in np.flatnonzero(targets[i])))
    assert w[0] == 0
    ast = targets @ (1000.0 / (counts + 0.01))  # AST's weights: proportional up to the smoothing
    np.testing.assert_allclose(w[1:] / w[1:].sum(), ast[1:] / ast[1:].sum(), rtol=1e-3)


def test_weighted_sampler_follows_the_weights_and_splits_ranks():
    weights = [1.0, 3.0, 0.0, 6.0]
    ranks = [WeightedDistributedSampler(weights, 3000, rank=r, world_size=3, seed=5) for r in range(3)]
    for s in ranks:
        s.set_epoch(1)
    draws = [list(s) for s in ranks]
    assert all(len(d) == len(s) == 1000 for d, s in zip(draws, ranks))
    single = WeightedDistributedSampler(weights, 3000, seed=5)
    single.set_epoch(1)
    merged = [None] * 3000
    for r, d in enumerate(draws):
        merged[r::3] = d
    assert merged == list(single)  # the ranks partition one weighted draw
    freq = np.bincount(merged, minlength=4) / 3000
    np.testing.assert_allclose(freq, [0.1, 0.3, 0.0, 0.6], atol=0.03)
    single.set_epoch(2)
    assert list(single) != merged


@pytest.mark.parametrize("length", [1, 599, 600, 601, 1199, 1200, 2401])
def test_all_windows_are_full_of_audio(tmp_path, length):
    """eval_windows=all: windows are consecutive slices of the clip from its start, except the last, which
    ends at the clip's end (overlapping the one before); only a clip shorter than a window is zero-padded."""
    import soundfile as sf

    from asit.finetune import LabelledClips

    sr, n = 8000, 600
    wave = 0.1 + 0.5 * torch.rand(length)  # never 0, so a padded sample shows
    sf.write(tmp_path / "c.wav", wave.numpy(), sr, subtype="FLOAT")
    clips = LabelledClips([AudioEntry(str(tmp_path / "c.wav"), ("a",))], np.ones((1, 1), np.float32),
                          sample_rate=sr, num_samples=n, train=False, all_windows=True)
    windows = clips[0]["wave"]
    assert windows.shape == (max(1, -(-length // n)), n)
    if length <= n:
        assert torch.equal(windows[0, :length], wave) and not windows[0, length:].any()
    else:
        for k in range(windows.shape[0] - 1):
            assert torch.equal(windows[k], wave[k * n : (k + 1) * n]), k
        assert torch.equal(windows[-1], wave[-n:])


def test_balanced_sampler_gives_repeats_their_own_crops(tmp_path):
    """A clip drawn twice in one epoch (sampling with replacement) is cropped differently the second time;
    the first draw keeps the crop keyed on (seed, epoch, clip), and the ranks split one tagged draw."""
    import soundfile as sf

    from asit.finetune import LabelledClips

    weights = [5.0, 1.0, 0.0, 2.0, 1.0]
    plain = WeightedDistributedSampler(weights, 39, seed=3)
    tagged = WeightedDistributedSampler(weights, 39, seed=3, tag_repeats=True)
    ranks = [WeightedDistributedSampler(weights, 39, rank=r, world_size=3, seed=3, tag_repeats=True) for r in range(3)]
    for s in (plain, tagged, *ranks):
        s.set_epoch(2)
    pairs = list(tagged)
    assert [i for i, _ in pairs] == list(plain)
    assert [r for _, r in pairs] == [[i for i, _ in pairs[:k]].count(i) for k, (i, _) in enumerate(pairs)]
    assert max(r for _, r in pairs) >= 1  # clip 0 (weight 5 of 9) is drawn many times
    merged = [None] * 39
    for r, s in enumerate(ranks):
        merged[r::3] = list(s)
    assert merged == pairs

    sr, n = 8000, 500
    sf.write(tmp_path / "c.wav", torch.randn(3 * n + 7).numpy(), sr, subtype="FLOAT")
    clips = LabelledClips([AudioEntry(str(tmp_path / "c.wav"), ("a",))], np.ones((1, 1), np.float32),
                          sample_rate=sr, num_samples=n, train=True, seed=11)
    clips.set_epoch(2)
    first = clips[0]["wave"]
    assert torch.equal(clips[(0, 0)]["wave"], first)
    assert not torch.equal(clips[(0, 1)]["wave"], first) and not torch.equal(clips[(0, 2)]["wave"], first)
    assert torch.equal(clips[(0, 1)]["wave"], clips[(0, 1)]["wave"])  # still reproducible (exact resume)
