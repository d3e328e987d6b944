#!/bin/bash
# The strong-recipe comparisons of bench/RESULTS.md (#12) take longer than one machine lives here
# (a session's machine may be new, with nothing but the repository). Only the finished runs'
# summaries are committed, never checkpoints; `topdown compare` reuses a finished run from its
# summary alone, so the comparison continues from them on any machine.
#
#   bench/compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]]
#                                                  restore the committed summaries into $OUT, then topdown
#                                                  compare TASK --preset bench --seeds SEEDS --jobs JOBS --set ...
#   bench/compare_bench.sh extra TASK SEED J [--set K=V ...]
#                                                  train only best-of-k's J-th fresh baseline of seed SEED,
#                                                  as `compare` would (its name, seed and recipe), for a
#                                                  machine that lives shorter than a cascade: every whole
#                                                  run it finishes is collected, and `run` reuses it
#   bench/compare_bench.sh equal TASK SEED [--set K=V ...]
#                                                  train only seed SEED's equal-epochs baseline, as `compare`
#                                                  would, once that seed's cascade has finished (its epochs
#                                                  are the budget): a second process's work while `run`
#                                                  trains the other seeds' cascades, reused by `run`
#   bench/compare_bench.sh collect TASK            copy every finished run's summary (and compare.*)
#                                                  from $OUT back under bench/results/NAME-compare-bench/
#
# NAME names the comparison, TASK unless set (a second comparison of one task, e.g. the same task's
# recipe of another length, needs its own: NAME=asr-rnn-e80). OUT defaults to ~/bench-compare/NAME,
# outside the repository (`topdown report OUT` shows where each run stands); the committed results are
# bench/results/NAME-compare-bench/; PRESET defaults to bench. Each process runs one thread unless
# OMP_NUM_THREADS says otherwise (two, for a run alone on the machine: a cascade or equal-epochs run
# that fits a session only so).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:?usage: compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]] | extra TASK SEED J | equal TASK SEED | collect TASK}
task=${2:?which task?}
name=${NAME:-$task}
out=${OUT:-$HOME/bench-compare/$name}
results=$here/results/$name-compare-bench
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

source "$here/summaries.sh"

# the committed summaries of finished runs, into $OUT where it lacks them (a new machine's)
restore_finished() {
  local summary run
  mkdir -p "$out/runs"
  for summary in "$results"/runs/*/summary.json; do
    [ -f "$summary" ] || continue
    run=$(basename "$(dirname "$summary")")
    if [ ! -e "$out/runs/$run" ]; then mkdir -p "$out/runs/$run" && cp "$summary" "$out/runs/$run/"; fi
  done
}

case $mode in
  run)
    seeds=${3:?how many seeds?}
    restore_finished
    jobs=${4:-1}
    shift $(( $# < 4 ? $# : 4 ))
    cd "$HOME" && exec topdown compare "$task" --preset "${PRESET:-bench}" --seeds "$seeds" --jobs "$jobs" --out "$out" "$@" ;;
  extra)
    seed=${3:?which comparison seed?}; j=${4:?which extra baseline (1, 2, ...)?}
    shift $(( $# < 4 ? $# : 4 ))
    line=$(python -c "from topdown.compare import extra_run, extra_seed
print(extra_run($seed, $j), extra_seed($seed, $j))")
    read -r run run_seed <<< "$line"
    restore_finished
    finished "$out/runs/$run/summary.json" && { echo "$run: finished"; exit 0; }
    resume=(); [ -f "$out/runs/$run/summary.json" ] && resume=(--resume)
    cd "$HOME" && exec topdown baseline "$task" --preset "${PRESET:-bench}" --seed "$run_seed" --out "$out/runs/$run" "${resume[@]}" "$@" ;;
  equal)
    seed=${3:?which comparison seed?}
    shift $(( $# < 3 ? $# : 3 ))
    line=$(python -c "from topdown.compare import cascade_run, equal_run
print(cascade_run($seed), equal_run($seed))")
    read -r cascade_name run <<< "$line"
    restore_finished
    cascade=$out/runs/$cascade_name/summary.json
    finished "$cascade" || { echo "compare_bench.sh: $cascade is not a finished cascade; the equal-epochs baseline needs its epochs" >&2; exit 2; }
    finished "$out/runs/$run/summary.json" && { echo "$run: finished"; exit 0; }
    # the --set flags that turn the preset's recipe into compare's equal-epochs one (equal_epochs_config)
    # (after the caller's own, which they override where both set a key, as in compare)
    budget_sets=$(python -c "import json, sys
from topdown.compare import equal_epochs_config
from topdown.config import parse_overrides
from topdown.errors import ConfigError
from topdown.tasks import resolve_config
stages = json.load(open('$cascade'))['stages']
given = [v for flag, v in zip(sys.argv[1:], sys.argv[2:]) if flag == '--set']
try:
    base = resolve_config('$task', '${PRESET:-bench}', parse_overrides(given))
except ConfigError as e:
    sys.exit(f'compare_bench.sh: {e}')
recipe = base.as_dict()
equal = equal_epochs_config(base, sum(st['epochs'] for st in stages)).as_dict()
print(' '.join(f'--set {part}.{k}={v}' for part, d in equal.items() if isinstance(d, dict)
               for k, v in d.items() if recipe[part].get(k) != v))" "$@")
    resume=(); [ -f "$out/runs/$run/summary.json" ] && resume=(--resume)
    # shellcheck disable=SC2086  # budget_sets is a list of --set K=V words
    cd "$HOME" && exec topdown baseline "$task" --preset "${PRESET:-bench}" --seed "$seed" --out "$out/runs/$run" "${resume[@]}" "$@" $budget_sets ;;
  collect)
    copy_finished "$out/runs" "$results/runs"
    for f in compare.json compare.md compare.png; do [ -f "$out/$f" ] && cp "$out/$f" "$results/"; done
    echo "collected into $results: $(ls "$results/runs" 2>/dev/null | wc -l) finished runs" ;;
  *) echo "compare_bench.sh: unknown mode '$mode' (run, extra, equal or collect)" >&2; exit 2 ;;
esac
