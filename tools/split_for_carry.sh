#!/usr/bin/env bash
# Split files too large for one device call (the lent GPU machines take 64 MiB per call, repository
# included) into numbered pieces, one folder per call: .carry/1, .carry/2, ... Name one folder in each
# call's `carry`, in calls that follow each other while the machine stays warm (earlier pieces stay
# there); tools/gpu_check.sh then joins the pieces, checks the SHA-256 and installs the wheels inside.
#
#   tools/split_for_carry.sh [--mib N] FILE...      (default N = 56)
#
# Example, DALI for the GPU machine (Python 3.12; DALI's audio path needs none of its image or
# compression libraries):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d /tmp/dali nvidia-dali-cuda130==2.4.0 astunparse==1.6.3 gast==0.7.0 six==1.17.0 optree==0.20.0 \
#       nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
#   tools/split_for_carry.sh /tmp/dali/*.whl      # 195 MiB -> 4 folders
set -euo pipefail
cd "$(dirname "$0")/.."
mib=56
if [ "${1:-}" = "--mib" ]; then mib="$2"; shift 2; fi
[ "$#" -gt 0 ] || { echo "usage: $0 [--mib N] FILE..." >&2; exit 2; }
for f in "$@"; do [ -f "$f" ] || { echo "$0: no such file: $f" >&2; exit 2; }; done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rel=()
for f in "$@"; do rel+=("$(realpath --relative-to=/ "$f")"); done
dupes="$(for f in "$@"; do basename "$f"; done | sort | uniq -d)"
[ -z "$dupes" ] || { echo "$0: two files share a name: $dupes" >&2; exit 2; }
tar -cf "$work/bundle.tar" -C / --transform 's,.*/,,' "${rel[@]}"  # flat: names only
split -b "${mib}M" -d -a 2 "$work/bundle.tar" "$work/part."
parts=("$work"/part.*)
sum="$(sha256sum "$work/bundle.tar" | cut -d' ' -f1)"
rm -rf .carry
for i in "${!parts[@]}"; do
    dir=".carry/$((i + 1))"
    mkdir -p "$dir"
    mv "${parts[$i]}" "$dir/"
    printf '%s %s\n' "$sum" "${#parts[@]}" >"$dir/BUNDLE"  # the whole bundle's SHA-256 and piece count
done
echo "$(du -sh "$work/bundle.tar" | cut -f1) in ${#parts[@]} pieces of at most $mib MiB:"
for i in "${!parts[@]}"; do echo "  call $((i + 1)): carry [\".carry/$((i + 1))\"]"; done
echo "The calls must follow each other within the machine's idle release (status: idle_release_s)."
echo "The last one runs tools/gpu_check.sh, which joins and installs them."
