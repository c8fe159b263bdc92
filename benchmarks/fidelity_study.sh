#!/usr/bin/env bash
# The fidelity study behind docs/fidelity.md: every figure there comes from the files this
# script writes into benchmarks/results/fidelity/. Needs the demo pool (`make demo` first).
# Two streams run side by side, one thread each (2-core machine), then one last run with
# both threads, then the lm-eval benchmark runs; about an hour and a half in all.
#
#   bash benchmarks/fidelity_study.sh                     # everything
#   bash benchmarks/fidelity_study.sh --benchmarks-only   # only the lm-eval benchmark runs
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

# lm-eval benchmark fidelity on the pool's own tasks (the references above are reused),
# with the benchmark objective of benchmarks/mean_acc.yaml.
benchmark_runs() {
  "$MM" make-tasks pools/demo --out eval_tasks > /dev/null
  "$MM" make-tasks pools/study-long --out eval_tasks > /dev/null
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 validate pools/demo demo-lmeval 16 \
    --tasks mm_demo --include-path eval_tasks --objective benchmarks/mean_acc.yaml
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 validate pools/study-long long16-lmeval 16 \
    --tasks mm_study_long --include-path eval_tasks --objective benchmarks/mean_acc.yaml
}

if [ "${1:-}" = "--benchmarks-only" ]; then
  benchmark_runs
  echo "done: $OUT"
  exit 0
fi

stream_a & a=$!
stream_b & b=$!
wait $a; wait $b
longer
benchmark_runs
echo "done: $OUT"
