#!/usr/bin/env bash
# Second device call of 2026-11-27 (session 4): re-checks after the fixes, most important first.
set -uo pipefail
export PYTHONUNBUFFERED=1 ASIT_CACHE=/tmp/asit-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asit-site .whl/*.whl >"$OUT/install.log" 2>&1
export PYTHONPATH="/tmp/asit-site"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/install.log" 2>&1 || echo "editable install failed"
echo "== demo on the GPU (compiled, bf16, sync-free, fbank on the device)"
timeout 95 torchrun --nproc_per_node=1 scripts/pretrain.py train.epochs=2 train.progress=false \
    train.output_dir=/tmp/demo-run data.cache_dir=/tmp/demo-data >"$OUT/demo.log" 2>&1; echo "rc=$?"
grep -E "data:|precision|sync|step +[0-9]+|loss|Error|error" "$OUT/demo.log" | tail -n 14
echo "== pipeline bench"
timeout 65 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pipeline.py bench/test_bench_ops.py \
    -k "torch or (gmml and ref_compiled)" --benchmark-json="$OUT/pipe.json" >"$OUT/pipe.log" 2>&1
tail -n 4 "$OUT/pipe.log"
echo "== tests"
timeout 85 python3 -m pytest -p no:cacheprovider -rfE --tb=short --timeout 60 \
    tests/test_kernels_gmml.py::test_sampled_blocks_bit_identical \
    tests/test_kernels_distill_ce.py::test_noncontiguous_inputs_and_2d_center \
    tests/test_data_fbank_batched.py::test_cuda_matches_cpu \
    tests/test_train_sync_free.py::test_sync_free_step_on_cuda_never_syncs >"$OUT/tests.log" 2>&1
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -n 12
echo "== train bench"
timeout 150 python3 -m pytest -q -p no:cacheprovider bench/test_bench_train.py -k "fast and not host" \
    --benchmark-json="$OUT/train.json" >"$OUT/train.log" 2>&1
tail -n 3 "$OUT/train.log"
{ python3 bench/summarize.py "$OUT/pipe.json"; echo; python3 bench/summarize.py "$OUT/train.json"; } | tee "$OUT/summary.md"
