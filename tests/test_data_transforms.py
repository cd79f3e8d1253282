"""Waveform transforms: the random crop (or zero pad) and the random circular roll."""

import torch

from asit.data import pad_or_crop_random, random_roll


def test_pad_or_crop_random():
    wave = torch.arange(10, dtype=torch.float32)
    padded = pad_or_crop_random(wave, 14, None)
    assert torch.equal(padded, torch.cat([wave, torch.zeros(4)]))
    g = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        crop = pad_or_crop_random(wave, 4, g)
        start = int(crop[0])
        assert torch.equal(crop, wave[start : start + 4])  # contiguous window, no resizing
        starts.add(start)
    assert starts == set(range(7))  # every offset 0..6 reachable


def test_random_roll_probability_and_shift():
    wave = torch.arange(50, dtype=torch.float32)
    assert torch.equal(random_roll(wave, 0.0, torch.Generator().manual_seed(0)), wave)
    g = torch.Generator().manual_seed(1)
    rolled = [random_roll(wave, 1.0, g) for _ in range(20)]
    for r in rolled:
        shift = int((50 - int(r[0])) % 50)
        assert torch.equal(r, torch.roll(wave, shift))
    assert len({int(r[0]) for r in rolled}) > 5
    g = torch.Generator().manual_seed(2)
    changed = sum(not torch.equal(random_roll(wave, 0.5, g), wave) for _ in range(400))
    assert 150 < changed < 250
