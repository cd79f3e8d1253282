#!/usr/bin/env bash
# Sourced by the calls of session 7 (2026-11-27): installs the carried wheels and the project offline
# (with scripts/gpu_check.sh's path shim when the editable install cannot be built).
export PYTHONUNBUFFERED=1 ASIT_CACHE=/tmp/asit-cache
mkdir -p "$OUT"
if [ ! -f /tmp/asit-site/.done ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/asit-site \
        .whl/*.whl >>"$OUT/install.log" 2>&1 && touch /tmp/asit-site/.done
fi
export PYTHONPATH="/tmp/asit-site:${PYTHONPATH:-}"
if ! python3 -c "import asit, asit_kernels" 2>/dev/null; then
    if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >>"$OUT/install.log" 2>&1; then
        mkdir -p /tmp/asit-shim && ln -sfn "$PWD/kernels" /tmp/asit-shim/asit_kernels
        export PYTHONPATH="$PWD:/tmp/asit-shim:$PYTHONPATH"
        echo "editable install failed (see install.log); using a path shim"
    fi
fi
