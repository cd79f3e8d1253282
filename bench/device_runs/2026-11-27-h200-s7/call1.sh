#!/usr/bin/env bash
# Call 1 of session 7 (2026-11-27, carries .carry/1 and .whl): the torch backends of the whole data
# pipeline on 16 cores + the GPU (batch ring and device fbank: unmeasured there so far) and the GPU
# data tests that need no DALI. Keeps the DALI piece outside the repository as well.
set -uo pipefail
mkdir -p /tmp/pk && cp -r .carry/1 /tmp/pk/
source bench/device_runs/2026-11-27-h200-s7/setup.sh
python3 -c "import platform, torch, triton; print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$OUT/env.txt"
{ nproc; df -h /dev/shm | tail -n 1; } | tr "\n" " " | tee -a "$OUT/env.txt"; echo
echo "== pipeline bench, torch backends"
timeout 140 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pipeline.py -k "not dali" \
    --benchmark-json="$OUT/pipe_torch.json" >"$OUT/pipe_torch.log" 2>&1; echo "rc=$?"
tail -n 4 "$OUT/pipe_torch.log"
python3 bench/summarize.py "$OUT/pipe_torch.json" | tee "$OUT/summary_torch.md"
echo "== GPU data tests without DALI"
timeout 80 python3 -m pytest -p no:cacheprovider -rfEs --tb=short -n 8 tests/test_data_fbank_batched.py \
    tests/test_data_ring.py tests/test_train_sync_free.py >"$OUT/tests1.log" 2>&1; echo "rc=$?"
grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests1.log" | tail -n 12
