"""Benchmark setup: device choice and the session's measured copy bandwidth (the floor to compare to)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # importing the kernels must not need a GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def copy_gbps(device) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time), median of a few runs."""
    n = (256 if device.type == "cuda" else 32) * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * 4 / times[len(times) // 2] / 1e9


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """With `--benchmark-json` and `ASIT_BENCH_ROWS=<file.csv>`, also append the figures as rows (bench/results.py)."""
    if os.environ.get("ASIT_BENCH_ROWS"):
        from results import append_rows, rows_from_pytest_benchmark

        rows = rows_from_pytest_benchmark(output_json, machine=os.environ.get("ASIT_BENCH_MACHINE", ""),
                                          command="pytest " + " ".join(config.invocation_params.args))
        append_rows(rows, os.environ["ASIT_BENCH_ROWS"])
