#!/usr/bin/env bash
# The GPU check for a short window on a machine without internet (torch + CUDA, triton, torchaudio, timm,
# pytest-benchmark installed; this repository copied in, at most 64 MiB with any carried wheels).
# Budget: ASIT_CHECK_BUDGET_S seconds in all (default 530, under 9 minutes). Ordered so the figures that
# matter most come first, each step under its own `timeout` and cut to the time left:
#   1. the train-step matrix with its profiles: fast against authors mode, ViT-S and ViT-B at batch 64
#      (bench/test_bench_train.py::test_modes)                                          ~3 min
#   2. the tests that only a GPU can run (`-m gpu`: ticket ordering across programs, the captured step,
#      the GELU epilogue, the design-shape sampler, real device syncs): is the new code right on hardware
#   3. the op bench's device times, eager reference against Triton (bench/test_bench_ops.py)
#   4. the levers against fast mode on ViT-B (test_levers; new builds stop after ASIT_BENCH_LEVER_BUDGET_S)
#   5. the trainer fed from FLAC files against its synthetic-batch rate (test_bench_pipeline.py)
#   6. the ops' incremental peak memory (ASIT_BENCH_PEAK=only), then the compiled references' device times
#   7. the test suite on CUDA (-m "not slow"), the GPU-specific files first, with whatever time is left.
# After every step the results so far are published to $OUT as at most 8 files (what a lent machine sends
# back): summary.md, train.json (every train figure and profile summary), bench_ops.json, rows.csv
# (bench/results.py rows), tests.log, traces.tar (the profiles' gzipped Chrome traces, trimmed to 15 MiB)
# and logs.tar.gz (every step's log and the peak / compiled op JSONs), so a run cut short still leaves its JSON and summary.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
WORK="$(mktemp -d /tmp/asit-gpu-check.XXXX)"
mkdir -p "$OUT" "$WORK/train" "$WORK/logs"
export PYTHONUNBUFFERED=1 ASIT_CACHE="${ASIT_CACHE:-$(mktemp -d)}" ASIT_BENCH_OUT="$WORK/train" \
    ASIT_BENCH_ROWS="$WORK/rows.csv" ASIT_BENCH_MACHINE="${ASIT_BENCH_MACHINE:-gpu-check}"
BUDGET="${ASIT_CHECK_BUDGET_S:-530}"
START=$(date +%s)
status=0
echo "| step | exit | seconds |" >"$WORK/steps.md"
echo "|---|---|---|" >>"$WORK/steps.md"

left() { echo $((BUDGET - ($(date +%s) - START))); }

publish() {  # the results so far, as at most 8 files in $OUT
    python3 - "$WORK" "$OUT" <<'PY' 2>>"$WORK/logs/publish.log"
import glob, json, os, sys, tarfile
work, out = sys.argv[1:3]
doc = {}
for path in sorted(glob.glob(f"{work}/train/*.json")) + sorted(glob.glob(f"{work}/train/profiles/*.profile.json")):
    try:
        doc[os.path.relpath(path, f"{work}/train")] = json.load(open(path))
    except (OSError, ValueError) as err:
        doc[os.path.relpath(path, f"{work}/train")] = {"error": str(err)}
json.dump(doc, open(f"{out}/train.json", "w"), indent=1)
traces = sorted(glob.glob(f"{work}/train/profiles/*.trace.json.gz"), key=lambda p: ("base" not in p, p))
with tarfile.open(f"{out}/traces.tar", "w") as tar:
    size = 0
    for path in traces:  # ViT-B first; stop before 15 MiB
        size += os.path.getsize(path)
        if size > 15 * 2**20:
            break
        tar.add(path, arcname=os.path.basename(path))
with tarfile.open(f"{out}/logs.tar.gz", "w:gz") as tar:  # every step's log, the peak and compiled op JSONs
    tar.add(f"{work}/logs", arcname="logs")
    for path in sorted(glob.glob(f"{work}/bench_ops_*.json")):
        tar.add(path, arcname=os.path.basename(path))
PY
    [ -f "$WORK/rows.csv" ] && cp "$WORK/rows.csv" "$OUT/rows.csv"
    [ -f "$WORK/bench_ops.json" ] && cp "$WORK/bench_ops.json" "$OUT/bench_ops.json"
    [ -f "$WORK/logs/tests.log" ] && cp "$WORK/logs/tests.log" "$OUT/tests.log"
    {
        echo "# GPU check ($(date -u +%F), $(tail -n 1 "$WORK/logs/env.txt" 2>/dev/null), commit $(git rev-parse --short=12 HEAD 2>/dev/null))"
        echo; cat "$WORK/steps.md"; echo
        [ -f "$WORK/train/train_summary.md" ] && cat "$WORK/train/train_summary.md" && echo
        if [ -f "$WORK/train/trainer_on_files.json" ]; then
            echo "## trainer on FLAC files"; echo; echo '```'; cat "$WORK/train/trainer_on_files.json"; echo '```'; echo
        fi
        for f in bench_ops bench_ops_compiled bench_ops_peak; do
            [ -f "$WORK/$f.json" ] && echo "## $f" && echo && python3 bench/summarize.py "$WORK/$f.json" && echo
        done
        grep -E "passed|failed" "$WORK/logs/tests.log" 2>/dev/null | tail -n 1
    } >"$OUT/summary.md" 2>>"$WORK/logs/publish.log"
}

step() {  # step NAME SECONDS COMMAND...: run under `timeout`, cut to the budget left, then publish
    local name=$1 want=$2 rest t0 rc
    shift 2
    rest=$(($(left) - 10))
    if [ "$rest" -lt 20 ]; then
        echo "| $name | skipped: budget spent | 0 |" >>"$WORK/steps.md"
        return
    fi
    [ "$want" -gt "$rest" ] && want=$rest
    echo "== $name (up to ${want} s)"
    t0=$(date +%s)
    timeout --kill-after=5 "$want" "$@" >"$WORK/logs/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || status=1
    echo "| $name | $rc$([ "$rc" -eq 124 ] && echo ' (timed out)') | $(($(date +%s) - t0)) |" >>"$WORK/steps.md"
    grep -E "passed|failed|error" "$WORK/logs/$name.log" | tail -n 2
    publish
}

# Packages the machine lacks (soundfile, cffi, pycparser, webdataset, braceexpand on the lent GPU
# machines) may come along as wheels in .whl/ (python3 -m pip download --no-deps ... -d .whl NAME).
# Wheels too large for one call (DALI) may come in pieces from tools/split_for_carry.sh, carried
# call after call into .carry/<k>/: joined here when all are present and the SHA-256 matches.
wheels=()
: >"$WORK/logs/install.log"
if compgen -G ".carry/*/part.*" >/dev/null; then
    read -r want count <"$(ls .carry/*/BUNDLE | head -n 1)"
    pieces=$(ls .carry/*/part.* | awk -F/ '{print $NF" "$0}' | sort | cut -d" " -f2)
    have=$(echo "$pieces" | wc -l)
    # shellcheck disable=SC2086  # the piece paths have no spaces
    if [ "$have" -eq "$count" ] && [ "$(cat $pieces | sha256sum | cut -d" " -f1)" = "$want" ]; then
        rm -rf /tmp/asit-carried && mkdir -p /tmp/asit-carried && cat $pieces | tar -x -C /tmp/asit-carried
        wheels+=(/tmp/asit-carried/*.whl)
        echo "carried pieces: $count joined" | tee -a "$WORK/logs/install.log"
    else
        echo "carried pieces: $have of $count, or a SHA-256 mismatch; going on without them" \
            | tee -a "$WORK/logs/install.log"
    fi
fi
compgen -G ".whl/*.whl" >/dev/null && wheels+=(.whl/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asit-site \
        "${wheels[@]}" >>"$WORK/logs/install.log" 2>&1 && export PYTHONPATH="/tmp/asit-site:${PYTHONPATH:-}"
fi
# Install offline; fall back to a path shim when pip cannot build the editable install.
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$WORK/logs/install.log" 2>&1; then
    shim="$(mktemp -d)"
    ln -s "$PWD/kernels" "$shim/asit_kernels"
    export PYTHONPATH="$PWD:$shim:${PYTHONPATH:-}"
    echo "editable install failed (see install.log); using PYTHONPATH shim" | tee -a "$WORK/logs/install.log"
fi
python3 - <<'PY' | tee "$WORK/logs/env.txt"
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PY
{ nproc; df -h /dev/shm | tail -n 1; } | tr "\n" " " | sed "s/^/cores, shm: /" | tee -a "$WORK/logs/install.log"; echo
publish

bench=(python3 -m pytest -q -rfE --tb=short -p no:cacheprovider)
# 1. the train-step matrix and the profiles (the numbers that matter most)
step train_modes "${ASIT_CHECK_TRAIN_S:-170}" "${bench[@]}" "bench/test_bench_train.py::test_modes"
# 2. what only a GPU can check: the kernels' cross-program ordering, the captured step, the GELU epilogue
step gpu_tests "${ASIT_CHECK_GPU_TESTS_S:-60}" "${bench[@]}" -m gpu tests/
# 3. the op bench: device times of the eager references and the kernels (compiled references: step 6)
ASIT_BENCH_PEAK=0 \
    step bench_ops "${ASIT_CHECK_OPS_S:-60}" "${bench[@]}" bench/test_bench_ops.py -k "not ref_compiled" \
    --benchmark-json="$WORK/bench_ops.json"
# 4. the levers; no new variant is built after this many seconds of setup and compiling
ASIT_BENCH_LEVER_BUDGET_S="${ASIT_BENCH_LEVER_BUDGET_S:-70}" \
    step train_levers "${ASIT_CHECK_LEVERS_S:-100}" "${bench[@]}" "bench/test_bench_train.py::test_levers"
# 5. the trainer fed from files (1,024 clips: 16 steps of ViT-B at batch 64)
ASIT_BENCH_E2E_CLIPS="${ASIT_BENCH_E2E_CLIPS:-1024}" \
    step trainer_on_files "${ASIT_CHECK_FILES_S:-60}" "${bench[@]}" "bench/test_bench_pipeline.py::test_trainer_on_files"
# 6. the ops' incremental peak memory (one process per case, nothing else timed), then the compiled references
ASIT_BENCH_PEAK=only \
    step bench_ops_peak "${ASIT_CHECK_PEAK_S:-35}" "${bench[@]}" bench/test_bench_ops.py -k "not ref_compiled" \
    --benchmark-json="$WORK/bench_ops_peak.json"
ASIT_BENCH_PEAK=0 \
    step bench_ops_compiled "${ASIT_CHECK_COMPILED_S:-45}" "${bench[@]}" bench/test_bench_ops.py -k ref_compiled \
    --benchmark-json="$WORK/bench_ops_compiled.json"
# 7. the test suite with the time left, the GPU-specific files first (pytest keeps the first mention)
step tests 600 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -m "not slow" \
    tests/test_train_modes.py tests/test_train_levers.py tests/test_models_levers.py tests/test_profile_step.py tests/test_train_sync_free.py tests/test_train_step_graph.py \
    tests/test_kernels_ticket_order.py tests/test_kernels_masked_l1.py tests/test_kernels_distill_ce.py \
    tests/test_kernels_gmml.py tests/test_kernels_gmml_sample.py tests/test_kernels_linear_distill_ce.py tests/test_train_fused_head.py \
    tests/test_kernels_registration.py tests/test_data_fbank_batched.py tests/test_models.py tests/
cp "$WORK/logs/tests.log" "$OUT/tests.log" 2>/dev/null
publish
echo
cat "$OUT/summary.md"
exit $status
