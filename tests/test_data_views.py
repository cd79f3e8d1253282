"""How the views are cut from a clip: the authors roll the whole clip once before both views are cut
from it (``data.roll_mode=clip``), and v2 cuts its local views from the clip zero-padded to the
global crop length (``data.local_crop_from=padded``). Checked sample by sample on clips whose values
are their positions, and statistically against a small port of the authors' augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from asit.data.dataset import ClipViews

SR = 100  # samples per "second": small clips, exact positions


def _views(length: int, **kw) -> ClipViews:
    opts = dict(sample_rate=SR, crop_seconds=6.0, num_views=2, local_views=0, local_crop_seconds=2.0,
                roll_prob=0.5, fbank_on="device", seed=3)
    opts.update(kw)
    return ClipViews(**opts)


def _clip(length: int) -> torch.Tensor:
    return torch.arange(1, length + 1, dtype=torch.float32)  # value = position + 1; 0 = padding


def _rolled_window_shift(clip: np.ndarray, crop: np.ndarray) -> set[int]:
    """The roll shifts ``s`` for which ``crop`` is a window of ``roll(clip, s)`` followed by zeros.

    ``clip`` holds distinct non-zero values, so for each ``s`` the window's first value fixes its start."""
    total, length = len(clip), len(crop)
    if crop[0] == 0:  # a window past the clip's end: all zeros, fits any roll
        return set(range(total)) if not crop.any() else set()
    shifts = np.arange(total)[:, None]  # [S, 1]
    first = int(np.flatnonzero(clip == crop[0])[0])
    starts = (first + shifts) % total  # where the first value sits after rolling by s
    positions = starts + np.arange(length)[None, :]  # [S, L] window positions in the rolled clip
    values = np.where(positions < total, clip[(positions - shifts) % total], 0)
    return set(np.flatnonzero((values == crop[None, :]).all(axis=1)).tolist())


@pytest.mark.parametrize("length", [1000, 450])  # longer and shorter than the 600-sample crop
def test_clip_mode_cuts_every_view_from_one_rolled_clip(length):
    views = _views(length, local_views=2)
    clip = _clip(length)
    rolled_seen = 0
    for index in range(12):
        sample = views.make_sample(clip, index, torch.zeros(0), "clip.wav")
        crops = [c.numpy() for c in (*sample["waves"], *sample["local_waves"])]
        common = set.intersection(*[_rolled_window_shift(clip.numpy(), c) for c in crops[:2]])
        assert common, f"clip {index}: the two global views are not windows of one rolled clip"
        rolled_seen += 0 not in common
        for local in crops[2:]:  # windows of the same rolled clip, padded to 600 samples
            assert common & _rolled_window_shift(clip.numpy(), local)
    assert rolled_seen > 0


def test_view_mode_keeps_the_per_crop_roll():
    views = _views(1000, roll_mode="view", roll_prob=1.0)
    clip = _clip(1000).numpy()
    independent = 0
    for index in range(8):
        sample = views.make_sample(torch.from_numpy(clip), index, torch.zeros(0), "clip.wav")
        a, b = (c.numpy() for c in sample["waves"])
        independent += not (_rolled_window_shift(clip, a) & _rolled_window_shift(clip, b))
    assert independent > 0  # rolled separately, the two views rarely fit one rolled clip


def test_local_views_of_a_short_clip_reach_into_its_padding():
    length = 250  # 2.5 "s" clip: padded to 6 s, 2 s local windows start anywhere in [0, 400]
    padded = _views(length, local_views=4, roll_prob=0.0)
    plain = _views(length, local_views=4, roll_prob=0.0, local_crop_from="clip")
    starts_padded, starts_plain = [], []
    for index in range(40):
        for views, starts in ((padded, starts_padded), (plain, starts_plain)):
            local = views.make_sample(_clip(length), index, torch.zeros(0), "c.wav")["local_waves"]
            for row in local.numpy():
                nonzero = row[row > 0]
                starts.append(int(nonzero[0]) - 1 if len(nonzero) else length)
    assert max(starts_padded) > length - 100  # some windows start in the clip's last second or beyond
    assert any(s >= length for s in starts_padded)  # all padding: possible only from the padded clip
    assert max(starts_plain) <= length - 200  # windows of the clip itself: they end inside it


def _authors_first_second_fraction(rng: np.random.Generator, n: int, *, total: int, crop: int, sr: int) -> float:
    """Port of the authors' v1 augmentation: roll the whole clip with p = 0.5 by a uniform shift, then
    cut a uniform window; the fraction of views that contain the clip's first second."""
    hits = 0
    for _ in range(n):
        shift = int(rng.integers(0, total)) if rng.random() < 0.5 else 0
        start = int(rng.integers(0, total - crop + 1))
        first = (np.arange(sr) + shift) % total  # where the first second's samples are after the roll
        hits += bool(((first >= start) & (first < start + crop)).any())
    return hits / n


def test_roll_coverage_matches_the_authors():
    """10 s clips, 6 s views: the views hold the clip's first second about as often as the authors'."""
    total, crop = 10 * SR, 6 * SR
    expected = _authors_first_second_fraction(np.random.default_rng(0), 20000, total=total, crop=crop, sr=SR)
    fractions = {}
    for mode in ("clip", "view"):
        views = _views(total, roll_mode=mode)
        hits = n = 0
        for index in range(600):
            for row in views.make_sample(_clip(total), index, torch.zeros(0), "c.wav")["waves"].numpy():
                hits += bool(((row >= 1) & (row <= SR)).any())
                n += 1
        fractions[mode] = hits / n
    print(f"first second in a view: authors {expected:.3f}, clip mode {fractions['clip']:.3f}, "
          f"view mode {fractions['view']:.3f}")
    assert abs(fractions["clip"] - expected) < 0.05
    assert fractions["view"] < expected - 0.1  # the per-crop roll visibly differs


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="roll_mode"):
        _views(10, roll_mode="both")
    with pytest.raises(ValueError, match="local_crop_from"):
        _views(10, local_crop_from="middle")
