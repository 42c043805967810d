#!/usr/bin/env bash
# The main job, end to end on the embedded default: fetch assets -> data -> train (SIFT, ZeRO-2, two local
# ranks) -> eval (held-out response likelihood, generation samples and MMLU, base and tuned) -> report.
# Sets up the environment on first run; prints each stage's time and, at the end, the report's first table.
#   bash scripts/demo.sh [CONFIG] [section.key=value ...]     (default CONFIG: configs/demo.yaml)
#   SIFT_LLM_RANKS=N   number of local ranks (default 2)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
config=configs/demo.yaml
if [ $# -gt 0 ] && [[ "$1" != *=* ]]; then config=$1; shift; fi
started=$(date +%s)
mark=$started
cpu_file=$(mktemp)
cpu_seconds() {  # CPU seconds (user + sys) of this script's finished child processes so far, into $cpu
  times > "$cpu_file"  # in this shell: a $(...) subshell would report its own (no) children
  cpu=$(awk 'NR == 2 { t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); t += p[1] * 60 + p[2] } printf "%d", t }' "$cpu_file")
}
cpu=0
cpu_mark=0
stage() {  # stage NAME: print the previous stage's wall and CPU time, then this stage's banner
  local now
  now=$(date +%s)
  cpu_seconds
  [ -n "${current:-}" ] && echo "== $current: $((now - mark)) s wall, $((cpu - cpu_mark)) CPU-s"
  mark=$now
  cpu_mark=$cpu
  current=$1
  [ -n "$1" ] && echo "== $1"
  return 0
}

stage setup
bin=$(bash scripts/setup.sh)
stage assets
"$bin/sift-llm" assets
stage data
"$bin/sift-llm" data "$config" "$@"
stage train
# DeepSpeed's CPU all-reduce leaves a 66 MiB /dev/shm buffer per rank and master port: remove this run's
port=$("$bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_* "$cpu_file"' EXIT
bash launch.sh "$config" --num_gpus "${SIFT_LLM_RANKS:-2}" --master_port "$port" "$@"
run_dir=$("$bin/sift-llm" config "$config" "$@" --get run_dir)
stage eval
"$bin/sift-llm" eval "$run_dir"
stage ""
cpu_seconds
echo "== done in $(( $(date +%s) - started )) s wall, $cpu CPU-s (load average now: $(cut -d' ' -f1-3 /proc/loadavg))"
report=$run_dir/report.md
# the first table (held-out response likelihood, base vs tuned)
awk '/^\|/{shown=1; print; next} shown{exit}' "$report"
echo "report: $report"
