"""Shared test setup. Triton kernels run under the interpreter on CPU when there is no GPU."""

from __future__ import annotations

import os
import random

# Must happen before anything imports triton (the interpreter flag is read at import time).
try:
    import torch as _torch

    _HAS_CUDA = _torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """CUDA when available, else CPU (Triton kernels then run in the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, seeded into torch and printed; ASIT_TEST_SEED=<n> replays a failure."""
    fixed = os.environ.get("ASIT_TEST_SEED")
    value = int(fixed) if fixed else random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    print(f"seed={value}")
    return value


@pytest.fixture
def poison(monkeypatch) -> None:
    """Launchers fill their outputs with NaN / 0xFF first, so unwritten elements are caught."""
    monkeypatch.setenv("ASIT_KERNELS_POISON", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: tiny models on a shared 2-core machine run fastest so."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
