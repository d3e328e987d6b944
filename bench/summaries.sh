# Sourced by compare_bench.sh and ablation.sh: what both copy back from runs made outside the repository.

finished() { [ -f "$1" ] && grep -q '"status": "complete"' "$1"; }

# copy_finished FROM TO: each finished run FROM/NAME/summary.json to TO/NAME/ (never checkpoints)
copy_finished() {
  local summary name
  for summary in "$1"/*/summary.json; do
    finished "$summary" || continue
    name=$(basename "$(dirname "$summary")")
    mkdir -p "$2/$name" && cp "$summary" "$2/$name/"
  done
}
