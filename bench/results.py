"""Benchmark results as data: one CSV row per measured figure, in `bench/results/results.csv`.

Each row names the benchmark, the case, the metric with its unit, the size axis (`x`), the value, and
where, when and how it was measured (machine, device, software, date, commit, command), in the manner of
Liger-Kernel's `benchmark/data/all_benchmark_data.csv`. `bench/RESULTS.md` shows the current rows per
machine. Rows are only ever appended; a figure that a later run supersedes stays, and its `note` says why
it is not the current one.

    python bench/results.py convert run.json --machine h200 --command "pytest bench/test_bench_ops.py"

turns a pytest-benchmark JSON file into rows and appends them; `bench/conftest.py` does the same after a
benchmark run when `ASIT_BENCH_ROWS` names a CSV file.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

COLUMNS = ("benchmark", "case", "metric", "x", "value", "unit", "machine", "device", "software", "date", "commit",
           "command", "config", "note")
DEFAULT_PATH = Path(__file__).resolve().parent / "results" / "results.csv"

# extra_info keys the benches record, with their units; every other scalar goes to the `config` column
METRIC_UNITS = {
    "gbps": "GB/s", "copy_gbps": "GB/s", "device_ms": "ms", "device_gbps": "GB/s", "peak_mem_mb": "MiB",
    "host_us": "µs", "copy_frac": "ratio",
    "clips_per_s": "clips/s", "loader_wait_ms_per_batch": "ms", "consumer_ms_per_batch": "ms",
    "clips_per_s_per_core": "clips/s", "speedup_vs_authors": "x",
    "ms_per_step": "ms", "samples_per_s": "samples/s", "tflops": "TFLOP/s", "peak_tflops": "TFLOP/s",
    "mfu": "ratio", "peak_mem_gb": "GiB", "collate_ms": "ms", "flops_per_sample": "FLOP",
}
_SOFTWARE_KEYS = ("torch", "triton")
_BENCHMARK_OF_TEST = {"test_bench": "ops", "test_pipeline_end_to_end": "pipeline", "test_train_step": "train"}


def append_rows(rows: Iterable[Mapping[str, object]], path: str | Path = DEFAULT_PATH) -> int:
    """Append `rows` (mappings with keys from `COLUMNS`; missing keys are empty) to the CSV file at `path`.

    Writes the header when the file is new. Returns the number of rows written. Unknown keys are an error,
    so a misspelt column never disappears silently.
    """
    path = Path(path)
    rows = list(rows)
    for row in rows:
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown result columns {sorted(unknown)}; the columns are {COLUMNS}")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, lineterminator="\n")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    return len(rows)


def read_rows(path: str | Path = DEFAULT_PATH) -> list[dict[str, str]]:
    """All rows of the CSV file at `path`, as dictionaries of strings."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _fmt(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def rows_from_pytest_benchmark(data: Mapping, *, machine: str, command: str, software: str = "",
                               note: str = "") -> list[dict[str, str]]:
    """Rows for every figure in a pytest-benchmark JSON document (`--benchmark-json`).

    Per benchmark: the median, minimum and maximum round time, then each numeric `extra_info` entry
    listed in `METRIC_UNITS`. The commit is the one pytest-benchmark recorded, with `+dirty` when the tree
    had uncommitted changes.
    """
    commit_info = data.get("commit_info") or {}
    commit = (commit_info.get("id") or "")[:12]
    if commit and commit_info.get("dirty"):
        commit += "+dirty"
    date = (data.get("datetime") or "")[:10]
    rows = []
    for bench in data.get("benchmarks", []):
        name = bench["name"]
        test, _, param = name.partition("[")
        param = param.rstrip("]")
        info = bench.get("extra_info") or {}
        benchmark = _BENCHMARK_OF_TEST.get(test, "data" if test.startswith("test_data") else test)
        shape = re.search(r"\d+(?:x\d+)+", param)
        x = shape.group(0) if shape else (f"batch={info['batch']}" if "batch" in info else "")
        sw = [f"{k} {info[k]}" for k in _SOFTWARE_KEYS if k in info] + ([software] if software else [])
        config = ";".join(f"{k}={_fmt(v)}" for k, v in info.items()
                          if k not in METRIC_UNITS and k not in _SOFTWARE_KEYS and k not in ("device", "untimed"))
        base = {"benchmark": benchmark, "case": param or test, "x": x, "machine": machine,
                "device": str(info.get("device", info.get("cpu", ""))), "software": ", ".join(sw), "date": date,
                "commit": commit, "command": command, "config": config, "note": note}
        stats = bench["stats"]
        for metric, key in (("round_median", "median"), ("round_min", "min"), ("round_max", "max")):
            if not info.get("untimed"):  # e.g. a peak-memory-only case: its rounds time nothing
                rows.append({**base, "metric": metric, "value": _fmt(stats[key] * 1e3), "unit": "ms"})
        for key, unit in METRIC_UNITS.items():
            if isinstance(info.get(key), (int, float)) and not isinstance(info.get(key), bool):
                rows.append({**base, "metric": key, "value": _fmt(info[key]), "unit": unit})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    conv = sub.add_parser("convert", help="append the rows of a pytest-benchmark JSON file")
    conv.add_argument("json", type=Path)
    conv.add_argument("--machine", required=True, help="short machine label, e.g. h200 or cpu-2core")
    conv.add_argument("--command", required=True, help="the command that produced the file")
    conv.add_argument("--software", default="", help="software beyond torch/triton, e.g. 'dali 2.4.0'")
    conv.add_argument("--note", default="")
    conv.add_argument("--out", type=Path, default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    data = json.loads(args.json.read_text(encoding="utf-8"))
    n = append_rows(rows_from_pytest_benchmark(data, machine=args.machine, command=args.command,
                                               software=args.software, note=args.note), args.out)
    print(f"{n} rows appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
