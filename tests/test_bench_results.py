"""bench/results.py turns pytest-benchmark JSON into result rows: timed cases give their round times, a
peak-memory-only case (``ASIT_BENCH_PEAK=only``, ``untimed``) only its memory."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "bench" / "results.py"
_spec = importlib.util.spec_from_file_location("bench_results", _PATH)
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)


def _doc(**info):
    return {"commit_info": {"id": "0123456789abcdef", "dirty": True}, "datetime": "2026-12-06T17:00:00",
            "benchmarks": [{"name": "test_bench[ce_local-37888x1024-bf16-triton]", "extra_info": info,
                            "stats": {"median": 0.002, "min": 0.001, "max": 0.003}}]}


def test_timed_case_rows():
    rows = results.rows_from_pytest_benchmark(_doc(device_ms=0.15, device="H100", rotate=4), machine="h100",
                                              command="pytest bench/test_bench_ops.py")
    metrics = {r["metric"]: r for r in rows}
    assert set(metrics) == {"round_median", "round_min", "round_max", "device_ms"}
    assert metrics["round_median"]["value"] == results._fmt(2.0) and metrics["device_ms"]["unit"] == "ms"
    assert metrics["device_ms"]["x"] == "37888x1024" and metrics["device_ms"]["commit"] == "0123456789ab+dirty"
    assert metrics["device_ms"]["config"] == "rotate=4" and metrics["device_ms"]["device"] == "H100"


def test_peak_only_case_has_no_round_times():
    rows = results.rows_from_pytest_benchmark(_doc(peak_mem_mb=120.5, untimed=True, device="H100"), machine="h100",
                                              command="pytest bench/test_bench_ops.py")
    assert [(r["metric"], r["unit"]) for r in rows] == [("peak_mem_mb", "MiB")]
    assert "untimed" not in rows[0]["config"]
