#!/usr/bin/env bash
# The fidelity study behind docs/fidelity.md: every figure there comes from the files this
# script writes into benchmarks/results/fidelity/. Needs the demo pool (`make demo` first).
# Two streams run side by side, one thread each (2-core machine), then one last run with
# both threads, the general_share pools with 16 references, then the lm-eval benchmark runs;
# about two and a half hours in all.
#
#   bash benchmarks/fidelity_study.sh                     # everything
#   bash benchmarks/fidelity_study.sh --benchmarks-only   # only the lm-eval benchmark runs
#   bash benchmarks/fidelity_study.sh --general-share-16-only
#   bash benchmarks/fidelity_study.sh --search-picks-only
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

# The general_share pools with 16 references too (their first 8 reused), two at a time.
general_share16() {
  validate pools/study-gs25 gs25-16 16 & a=$!
  validate pools/study-gs0 gs0-16 16 & b=$!
  wait $a; wait $b
}

# The demo search's own top 3 picks (runs/demo, from `make demo`) next to the 16 mixtures
# above (all reused): does the recommended mixture train better than the alternatives?
search_picks_run() {
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 validate pools/demo demo-search 19 --run-dir runs/demo
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
  # The multiple-choice tasks with up to 1,000 items per domain instead of 200 (as many as
  # the held-out data holds): how much of the weaker benchmark fidelity is item noise.
  "$MM" make-tasks pools/demo --out runs/tasks-1000 --max-docs 1000 > /dev/null
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 validate pools/demo demo-lmeval-1000 16 \
    --tasks mm_demo_choice --include-path runs/tasks-1000 --objective benchmarks/mean_acc.yaml
  .venv/bin/python benchmarks/benchmark_metrics.py "$OUT/demo-lmeval" "$OUT/demo-lmeval-1000" \
    "$OUT/long16-lmeval" > "$OUT/benchmark-metrics.txt"
}

case "${1:-}" in
  --benchmarks-only) benchmark_runs; echo "done: $OUT"; exit 0 ;;
  --general-share-16-only) general_share16; echo "done: $OUT"; exit 0 ;;
  --search-picks-only) search_picks_run; echo "done: $OUT"; exit 0 ;;
esac

stream_a & a=$!
stream_b & b=$!
wait $a; wait $b
longer
general_share16
search_picks_run
benchmark_runs
echo "done: $OUT"
