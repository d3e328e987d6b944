#!/bin/bash
# The strong-recipe comparisons of bench/RESULTS.md take longer than one machine lives here (a new
# machine may have nothing but the repository). A comparison's finished runs are committed as one
# archive of their summaries and per-epoch metrics, never checkpoints:
# bench/results/NAME-compare-bench/runs.tar.xz. `topdown compare --runs-from` restores them and
# reuses a finished run from its summary alone, so the comparison continues from them on any machine.
#
#   bench/compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]]
#                              topdown compare TASK --preset bench --seeds SEEDS --jobs JOBS --set ...
#                              --out $OUT, from the committed runs
#   bench/compare_bench.sh extra TASK SEED J [--set K=V ...]
#                              only best-of-k's J-th fresh baseline of seed SEED (`compare --only
#                              baseline-seedSEED-extraJ`), for a machine that lives shorter than a
#                              cascade: every whole run it finishes is collected, and `run` reuses it
#   bench/compare_bench.sh equal TASK SEED [--set K=V ...]
#                              only seed SEED's equal-epochs baseline (`compare --only
#                              equal-epochs-seedSEED`), once that seed's cascade has finished (its
#                              epochs are the budget): a second process's work while `run` trains the
#                              other seeds' cascades, reused by `run`
#   bench/compare_bench.sh collect TASK
#                              pack every finished run of $OUT into the committed runs.tar.xz
#                              (bench/pack_runs.py) and copy compare.* beside it
#
# NAME names the comparison, TASK unless set (a second comparison of one task, e.g. the same task's
# recipe of another length, needs its own: NAME=asr-rnn-e80). OUT defaults to ~/bench-compare/NAME,
# outside the repository (`topdown report OUT` shows where each run stands); the committed results are
# bench/results/NAME-compare-bench/; PRESET defaults to bench. Each process runs one thread unless
# OMP_NUM_THREADS says otherwise (two, for a run alone on the machine: a cascade or equal-epochs run
# that fits a machine's life only so).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
mode=${1:?usage: compare_bench.sh run TASK SEEDS [JOBS [--set K=V ...]] | extra TASK SEED J | equal TASK SEED | collect TASK}
task=${2:?which task?}
name=${NAME:-$task}
out=${OUT:-$HOME/bench-compare/$name}
results=$here/results/$name-compare-bench
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# topdown compare on $OUT, first restoring the committed finished runs it lacks (a new machine's)
compare() {
  local from=()
  [ -f "$results/runs.tar.xz" ] && from=(--runs-from "$results/runs.tar.xz")
  cd "$HOME" && exec topdown compare "$task" --preset "${PRESET:-bench}" --out "$out" "${from[@]}" "$@"
}

case $mode in
  run)
    seeds=${3:?how many seeds?}
    jobs=${4:-1}
    shift $(( $# < 4 ? $# : 4 ))
    compare --seeds "$seeds" --jobs "$jobs" "$@" ;;
  extra)
    seed=${3:?which comparison seed?}; j=${4:?which extra baseline (1, 2, ...)?}
    shift $(( $# < 4 ? $# : 4 ))
    compare --seeds $(( seed + 1 )) --only "baseline-seed$seed-extra$j" "$@" ;;
  equal)
    seed=${3:?which comparison seed?}
    shift $(( $# < 3 ? $# : 3 ))
    compare --seeds $(( seed + 1 )) --only "equal-epochs-seed$seed" "$@" ;;
  collect)
    python "$here/pack_runs.py" "$out/runs" "$results/runs.tar.xz" --prefix runs/
    for f in compare.json compare.md compare.png; do [ -f "$out/$f" ] && cp "$out/$f" "$results/"; done
    echo "collected into $results" ;;
  *) echo "compare_bench.sh: unknown mode '$mode' (run, extra, equal or collect)" >&2; exit 2 ;;
esac
