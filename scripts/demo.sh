#!/usr/bin/env bash
# The main job, end to end on the embedded default: fetch assets -> data -> train (SIFT, ZeRO-2, two local
# ranks) -> eval (MMLU, base and tuned) -> report. Sets up the environment on first run.
#   bash scripts/demo.sh [CONFIG] [section.key=value ...]     (default CONFIG: configs/demo.yaml)
#   SIFT_LLM_RANKS=N   number of local ranks (default 2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
config=configs/demo.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi
bin=$(bash scripts/setup.sh)
started=$(date +%s)

echo "== assets"
"$bin/sift-llm" assets
echo "== data"
"$bin/sift-llm" data "$config" "$@"
echo "== train"
bash launch.sh "$config" --num_gpus "${SIFT_LLM_RANKS:-2}" "$@"
run_dir=$("$bin/sift-llm" config "$config" "$@" --get run_dir)
echo "== eval"
"$bin/sift-llm" eval "$run_dir"
echo "== done in $(( $(date +%s) - started )) s"
echo "report: $run_dir/report.md"
