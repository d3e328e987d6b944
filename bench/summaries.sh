# Sourced by compare_bench.sh and ablation.sh: what both copy back from runs made outside the repository.

finished() { [ -f "$1" ] && grep -q '"status": "complete"' "$1"; }

# copy_finished FROM TO: each finished run's FROM/NAME/summary.json and its per-epoch metrics.jsonl
# (a few kB: the curves behind "best epoch" and training-loss statements) to TO/NAME/; never checkpoints
copy_finished() {
  local summary run name
  for summary in "$1"/*/summary.json; do
    finished "$summary" || continue
    run=$(dirname "$summary"); name=$(basename "$run")
    mkdir -p "$2/$name" && cp "$summary" "$2/$name/"
    if [ -f "$run/metrics.jsonl" ]; then cp "$run/metrics.jsonl" "$2/$name/"; fi
  done
}
