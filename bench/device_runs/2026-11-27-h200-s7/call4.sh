#!/usr/bin/env bash
# Call 4 of session 7 (2026-11-27, carries .carry/4 after calls that carried .carry/1-3): joins the
# DALI wheels, then issue 4's DALI figures on the GPU: the GPU tests of the DALI loader, the whole
# pipeline with DALI (fbank by our batched fbank and by DALI's operators), the demo trained from
# DALI on the GPU, and DALI's CPU data path per core on this machine.
set -uo pipefail
for k in 1 2 3; do [ -d .carry/$k ] || cp -r /tmp/pk/$k .carry/$k 2>/dev/null; done
read -r want count <"$(ls .carry/*/BUNDLE | head -n 1)"
pieces=$(ls .carry/*/part.* | sort -t/ -k3)
if [ "$(echo "$pieces" | wc -l)" -eq "$count" ] && [ "$(cat $pieces | sha256sum | cut -d" " -f1)" = "$want" ]; then
    rm -rf /tmp/asit-carried && mkdir -p /tmp/asit-carried && cat $pieces | tar -x -C /tmp/asit-carried
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asit-site \
        /tmp/asit-carried/*.whl >>"$OUT/install.log" 2>&1; echo "DALI install rc=$?"
else
    echo "pieces missing or SHA-256 mismatch: $(echo $pieces)"; ls -la .carry/* /tmp/pk 2>&1 | head -20
fi
source bench/device_runs/2026-11-27-h200-s7/setup.sh
python3 -c "import nvidia.dali as d, torch; print('dali', d.__version__, 'torch', torch.__version__)" 2>&1 | tee "$OUT/env_dali.txt"
echo "== GPU tests of the DALI loader"
timeout 90 python3 -m pytest -p no:cacheprovider -rfEs --tb=short -n 8 tests/test_data_dali.py >"$OUT/tests4.log" 2>&1
echo "rc=$?"; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests4.log" | tail -n 12
echo "== pipeline bench, DALI"
timeout 110 python3 -m pytest -q -p no:cacheprovider bench/test_bench_pipeline.py -k dali \
    --benchmark-json="$OUT/pipe_dali.json" >"$OUT/pipe_dali.log" 2>&1; echo "rc=$?"
tail -n 4 "$OUT/pipe_dali.log"
python3 bench/summarize.py "$OUT/pipe_dali.json" | tee "$OUT/summary_dali.md"
echo "== demo trained from DALI on the GPU"
timeout 100 torchrun --nproc_per_node=1 scripts/pretrain.py data.backend=dali train.epochs=2 train.progress=false \
    train.output_dir=/tmp/demo-dali data.cache_dir=/tmp/demo-data >"$OUT/demo_dali.log" 2>&1; echo "rc=$?"
grep -E "data:|precision|sync|step +[0-9]+|loss|done:|Error|error" "$OUT/demo_dali.log" | tail -n 12
