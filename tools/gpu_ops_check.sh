#!/usr/bin/env bash
# GPU check of the fused ops (issue 17), for a lent GPU machine without internet (torch + CUDA, triton,
# pytest-benchmark there; this repository copied in). In order of importance, each step under its own
# timeout so a slow one cannot hide the next:
#   1. the kernel tests on CUDA (kernels against their float64 references, opcheck, torch.compile);
#   2. the op benchmark: device time from CUDA-graph replay, GB/s against the copy bandwidth of the same
#      run, incremental peak memory in a fresh process per case, host time per call;
#   3. a markdown summary.
# Files go to $OUT (at most 8; the lent machines send back what is there): ops_tests.log, ops.json,
# ops_rows.csv (rows for bench/results/results.csv, with device, date and commit), ops_bench.log,
# ops_summary.md. ASIT_BENCH_PEAK=0 skips the peak-memory processes (about a third of the bench's time).
#
#     bash tools/gpu_ops_check.sh          # or, alone: pytest bench/test_bench_ops.py --benchmark-json=$OUT/ops.json
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ASIT_CACHE="${ASIT_CACHE:-$(mktemp -d)}"
# asit and asit_kernels from this checkout, without installing anything
shim="$(mktemp -d)"
ln -s "$PWD/kernels" "$shim/asit_kernels"
export PYTHONPATH="$PWD:$shim:${PYTHONPATH:-}"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'device',
torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')" | tee "$OUT/ops_tests.log"

status=0
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
timeout 150 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider "${parallel[@]}" \
    tests/test_kernels_masked_l1.py tests/test_kernels_distill_ce.py tests/test_kernels_gmml.py \
    tests/test_kernels_gmml_sample.py tests/test_kernels_ticket_order.py \
    tests/test_kernels_registration.py 2>&1 | tee -a "$OUT/ops_tests.log" | tail -n 15
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

ASIT_BENCH_ROWS="$OUT/ops_rows.csv" ASIT_BENCH_MACHINE="${ASIT_BENCH_MACHINE:-gpu}" \
    timeout 420 python3 -m pytest -q -p no:cacheprovider bench/test_bench_ops.py \
    --benchmark-json="$OUT/ops.json" 2>&1 | tee "$OUT/ops_bench.log" | tail -n 5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

python3 bench/summarize.py "$OUT/ops.json" | tee "$OUT/ops_summary.md"
python3 - "$OUT/ops.json" <<'PY' | tee -a "$OUT/ops_summary.md"
import json, sys
rows = json.load(open(sys.argv[1])).get("benchmarks", [])
print("\n| case | device ms | GB/s | of copy | peak MiB | host µs | method |\n|---|---|---|---|---|---|---|")
for b in rows:
    i = b["extra_info"]
    print(f"| {b['name'][len('test_bench['):-1]} | {i.get('device_ms', 0):.4f} | {i.get('device_gbps', 0):.0f} | "
          f"{i.get('copy_frac', 0):.0%} | {i.get('peak_mem_mb', float('nan')):.1f} | {i.get('host_us', 0):.0f} | "
          f"{i.get('device_method', '')} |")
# issue 17's targets, from device time and peak memory: Triton against eager and torch.compile(reference)
cases = {}
for b in rows:
    case, _, provider = b["name"][len("test_bench["):-1].rpartition("-")
    cases.setdefault(case, {})[provider] = b["extra_info"]
print("\n| case | Triton vs eager (device) | vs compiled (device) | peak vs eager |\n|---|---|---|---|")
for case, p in cases.items():
    t = p.get("triton", {})
    if "device_ms" not in t:
        continue
    speed = {k: f"{p[k]['device_ms'] / t['device_ms']:.2f}x" if "device_ms" in p.get(k, {}) else ""
             for k in ("ref", "ref_compiled")}
    eager_peak = p.get("ref", {}).get("peak_mem_mb")
    peak = f"{t['peak_mem_mb'] / eager_peak:.2f}" if "peak_mem_mb" in t and eager_peak else ""
    print(f"| {case} | {speed['ref']} | {speed['ref_compiled']} | {peak} |")
PY
exit $status
