#!/bin/bash
# The strong-recipe comparisons of bench/RESULTS.md (#12) take longer than one machine lives here
# (a session's machine may be new, with nothing but the repository). Only the finished runs'
# summaries are committed, never checkpoints; `topdown compare` reuses a finished run from its
# summary alone, so the comparison continues from them on any machine.
#
#   bench/compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]]
#                                                  restore the committed summaries into $OUT, then topdown
#                                                  compare TASK --preset bench --seeds SEEDS --jobs JOBS --set ...
#   bench/compare_bench.sh collect TASK            copy every finished run's summary (and compare.*)
#                                                  from $OUT back under bench/results/TASK-compare-bench/
#
# OUT defaults to ~/bench-compare/TASK, outside the repository (`topdown report OUT` shows where each
# run stands); PRESET to bench. Each process runs one thread.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:?usage: compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]] | collect TASK}
task=${2:?which task?}
out=${OUT:-$HOME/bench-compare/$task}
results=$here/results/$task-compare-bench
export OMP_NUM_THREADS=1

source "$here/summaries.sh"

case $mode in
  run)
    seeds=${3:?how many seeds?}
    mkdir -p "$out/runs"
    for summary in "$results"/runs/*/summary.json; do
      [ -f "$summary" ] || continue
      run=$(basename "$(dirname "$summary")")
      if [ ! -e "$out/runs/$run" ]; then mkdir -p "$out/runs/$run" && cp "$summary" "$out/runs/$run/"; fi
    done
    jobs=${4:-1}
    shift $(( $# < 4 ? $# : 4 ))
    cd "$HOME" && exec topdown compare "$task" --preset "${PRESET:-bench}" --seeds "$seeds" --jobs "$jobs" --out "$out" "$@" ;;
  collect)
    copy_finished "$out/runs" "$results/runs"
    for f in compare.json compare.md compare.png; do [ -f "$out/$f" ] && cp "$out/$f" "$results/"; done
    echo "collected into $results: $(ls "$results/runs" 2>/dev/null | wc -l) finished runs" ;;
  *) echo "compare_bench.sh: unknown mode '$mode' (run or collect)" >&2; exit 2 ;;
esac
