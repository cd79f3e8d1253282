"""Per-iteration schedules (learning rate, weight decay, momentum, teacher temperature)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asit.train.schedules import cosine_schedule, teacher_temp_schedule


def test_cosine_endpoints_and_length() -> None:
    s = cosine_schedule(5e-4, 1e-6, epochs=10, iters_per_epoch=7, warmup_epochs=2)
    assert s.shape == (70,) and s.dtype == np.float64
    assert s[14] == pytest.approx(5e-4, rel=1e-12)  # first step after warm-up = base
    assert s[-1] == pytest.approx(1e-6, rel=1e-12)  # last step = final
    assert np.all(np.diff(s[14:]) <= 0)  # the cosine part only decreases


def test_warmup_is_linear_from_zero() -> None:
    s = cosine_schedule(1.0, 0.0, epochs=4, iters_per_epoch=5, warmup_epochs=2)
    np.testing.assert_allclose(s[:10], np.arange(10) / 10.0, rtol=0, atol=1e-15)
    assert s[10] == 1.0


def test_warmup_start_value() -> None:
    s = cosine_schedule(1.0, 0.5, epochs=3, iters_per_epoch=2, warmup_epochs=1, warmup_start=0.2)
    np.testing.assert_allclose(s[:2], [0.2, 0.6])


def test_cosine_midpoint() -> None:
    # without warm-up: base, ..., (base + final) / 2 at the middle, ..., final
    s = cosine_schedule(0.04, 0.4, epochs=1, iters_per_epoch=101)
    assert s[0] == pytest.approx(0.04) and s[50] == pytest.approx(0.22) and s[-1] == pytest.approx(0.4)
    assert np.all(np.diff(s) >= 0)  # weight decay rises


def test_single_iteration_after_warmup_is_final() -> None:
    s = cosine_schedule(1.0, 0.1, epochs=2, iters_per_epoch=1, warmup_epochs=1)
    np.testing.assert_allclose(s, [0.0, 0.1])


def test_warmup_longer_than_run() -> None:
    s = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=3, warmup_epochs=5)
    assert len(s) == 6
    np.testing.assert_allclose(s, np.arange(6) / 6.0)


@pytest.mark.parametrize("epochs, iters", [(0, 3), (3, 0)])
def test_cosine_rejects_empty(epochs: int, iters: int) -> None:
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, epochs, iters)


@settings(max_examples=60, deadline=None)
@given(base=st.floats(1e-6, 10.0), final=st.floats(0.0, 10.0), epochs=st.integers(1, 12),
       iters=st.integers(1, 9), warm=st.integers(0, 12))
def test_cosine_properties(base: float, final: float, epochs: int, iters: int, warm: int) -> None:
    s = cosine_schedule(base, final, epochs, iters, warm)
    assert len(s) == epochs * iters
    assert np.all(np.isfinite(s))
    w = min(warm, epochs) * iters
    if w < len(s):
        assert s[w] == pytest.approx(base if w < len(s) - 1 else final, rel=1e-9, abs=1e-12)
        assert s[-1] == pytest.approx(final, rel=1e-9, abs=1e-12)
        lo, hi = min(base, final), max(base, final)
        assert np.all(s[w:] >= lo - 1e-12) and np.all(s[w:] <= hi + 1e-12)
    if w > 0:
        assert s[0] == 0.0


def test_teacher_temperature_per_epoch() -> None:
    s = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=100, iters_per_epoch=4)
    assert s.shape == (400,)
    per_epoch = s.reshape(100, 4)
    assert np.all(per_epoch == per_epoch[:, :1])  # constant within an epoch
    epoch_values = per_epoch[:, 0]
    assert epoch_values[0] == pytest.approx(0.04)
    assert epoch_values[1] == pytest.approx(0.04 + 0.03 / 29)
    assert epoch_values[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert epoch_values[29] == pytest.approx(0.07)
    assert np.all(epoch_values[29:] == pytest.approx(0.07))
    assert np.all(np.diff(epoch_values) >= 0)


def test_teacher_temperature_v2_and_short_runs() -> None:
    v2 = teacher_temp_schedule(0.04, 0.07, warmup_epochs=5, epochs=8, iters_per_epoch=1)
    np.testing.assert_allclose(v2, [0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07, 0.07, 0.07])
    # warm-up longer than the run: the start of the same ramp (a prefix of the long run's schedule)
    short = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=4, iters_per_epoch=2)
    long = teacher_temp_schedule(0.04, 0.07, warmup_epochs=30, epochs=100, iters_per_epoch=2)
    assert short.shape == (8,)
    np.testing.assert_array_equal(short, long[:8])
    assert short[-1] == pytest.approx(0.04 + 0.03 * 3 / 29)
    # no warm-up
    flat = teacher_temp_schedule(0.04, 0.07, warmup_epochs=0, epochs=3, iters_per_epoch=2)
    np.testing.assert_allclose(flat, 0.07)
    assert all(math.isfinite(x) for x in flat)
    one = teacher_temp_schedule(0.04, 0.07, warmup_epochs=1, epochs=2, iters_per_epoch=1)
    np.testing.assert_allclose(one, [0.04, 0.07])
    with pytest.raises(ValueError):
        teacher_temp_schedule(0.04, 0.07, warmup_epochs=-1, epochs=2, iters_per_epoch=1)
