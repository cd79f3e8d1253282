"""Turn a pytest-benchmark JSON file into a markdown table (median time, GB/s vs copy, speed-ups).

    python bench/summarize.py bench.json
"""

from __future__ import annotations

import json
import re
import sys
from collections import defaultdict


def main(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        print(f"no benchmark results in {path}: {err}")
        return 1
    rows = []
    by_case: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in data.get("benchmarks", []):
        name = bench["name"]
        median = bench["stats"]["median"]
        info = bench.get("extra_info", {})
        provider = info.get("provider") or name.rstrip("]").split("-")[-1]  # ids end in -<provider>]
        case = re.sub(r"-(ref_compiled|ref|triton)\]$", "]", name)
        if not info.get("untimed"):  # device time where the bench has one (the rounds include host work)
            by_case[case][provider] = info.get("device_ms", median * 1e3)
        rows.append((name, median, info))
    print("| benchmark | median | GB/s | device ms (graph) | device GB/s | copy GB/s | other |")
    print("|---|---|---|---|---|---|---|")
    hidden = ("gbps", "copy_gbps", "device", "torch", "triton", "bytes", "device_ms", "device_gbps", "untimed")
    for name, median, info in rows:
        gbps = f"{info['gbps']:.1f}" if "gbps" in info else ""
        copy = f"{info['copy_gbps']:.0f}" if "copy_gbps" in info else ""
        dev_ms = f"{info['device_ms']:.4f}" if "device_ms" in info else ""
        dev_gbps = f"{info['device_gbps']:.0f}" if "device_gbps" in info else ""
        other = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
                          if k not in hidden)
        ms = info.get("ms_per_step", median * 1e3)  # the training bench times several steps per round
        round_ms = "" if info.get("untimed") else f"{ms:.3f} ms"
        print(f"| {name} | {round_ms} | {gbps} | {dev_ms} | {dev_gbps} | {copy} | {other} |")
    speedups = [(case, p) for case, p in by_case.items() if "triton" in p and ("ref" in p or "ref_compiled" in p)]
    if speedups:
        print("\n| case (device time where measured) | triton vs eager | triton vs compiled |\n|---|---|---|")
        for case, p in speedups:
            eager = f"{p['ref'] / p['triton']:.2f}x" if "ref" in p else ""
            comp = f"{p['ref_compiled'] / p['triton']:.2f}x" if "ref_compiled" in p else ""
            print(f"| {case} | {eager} | {comp} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "bench.json"))
