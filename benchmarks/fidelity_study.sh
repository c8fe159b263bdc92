#!/usr/bin/env bash
# The fidelity study behind docs/fidelity.md: every figure there comes from the files this
# script writes into benchmarks/results/fidelity/. Needs the demo pool (`make demo` first).
# Two streams run side by side, one thread each (2-core machine), then one last run with
# both threads; about an hour in all.
#
#   bash benchmarks/fidelity_study.sh
set -euo pipefail
cd "$(dirname "$0")/.."
MM=.venv/bin/merge-mix
OUT=benchmarks/results/fidelity
mkdir -p "$OUT"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

validate() {  # POOL NAME N [extra validate options...]
  local pool=$1 name=$2 n=$3
  shift 3
  { echo "\$ merge-mix validate $pool -n $n --out $OUT/$name $*"
    "$MM" validate "$pool" -n "$n" --out "$OUT/$name" --quiet "$@"; } > "$OUT/$name.txt" 2>&1
}

study() {  # NAME N: build pools/study-NAME.yaml and validate it with N references
  "$MM" train-components "pools/study-$1.yaml" --quiet > "$OUT/build-$1.txt" 2>&1
  validate "pools/study-$1" "$1" "$2"
}

stream_a() {
  # Merge rule first, so the pool keeps the whole-model calibration written last.
  validate pools/demo demo-keep-embed 16 --keep-base '*embed_tokens*'
  validate pools/demo demo 16
  study gs25 8
}

stream_b() {
  study long 8
  study gs0 8
}

# Afterwards, alone on the machine: the longer-trained pool with 16 references (the first 8
# are reused), enough for the calibration's pairwise form.
longer() {
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 validate pools/study-long long16 16
}

stream_a & a=$!
stream_b & b=$!
wait $a; wait $b
longer
echo "done: $OUT"
