#!/usr/bin/env bash
# Call 5 of session 7: the DALI pipeline bench again with one long epoch (the corpus of 96 clips gave
# one step per epoch, so every batch built a new pipeline), then call 1's GPU tests one at a time.
set -uo pipefail
source bench/device_runs/2026-11-27-h200-s7/setup.sh
timeout 80 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pipeline.py -k dali \
    --benchmark-json="$OUT/pipe_dali2.json" >"$OUT/pipe_dali2.log" 2>&1; echo "rc=$?"
python3 bench/summarize.py "$OUT/pipe_dali2.json" | tee "$OUT/summary_dali2.md"
timeout 120 python3 -m pytest -v -p no:cacheprovider -rfEs --tb=short --timeout 50 tests/test_data_fbank_batched.py \
    tests/test_data_ring.py tests/test_train_sync_free.py >"$OUT/tests5.log" 2>&1; echo "rc=$?"
grep -E "FAILED|ERROR|SKIPPED|Timeout|passed|failed" "$OUT/tests5.log" | tail -n 20
