#!/usr/bin/env bash
# Train through the deepspeed launcher:  ./launch.sh CONFIG [launcher args] [section.key=value ...] [--resume [CKPT]]
#
# Launcher arguments (--num_gpus, --num_nodes, --hostfile, --include, --master_port, ...) pass through to
# `deepspeed`. On a machine without GPUs, --num_gpus N starts N local CPU ranks over gloo (default 1).
# Examples:
#   ./launch.sh configs/llama7b_alpaca.yaml --num_gpus 8
#   ./launch.sh configs/llama7b_alpaca.yaml --hostfile hosts --num_nodes 2 --master_port 29501
#   ./launch.sh configs/demo.yaml --num_gpus 2 train.max_steps=10
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
config=$1
shift
bin=$(bash "$root/scripts/setup.sh")

launcher=()
program=()
resume=()
while [ $# -gt 0 ]; do
  case "$1" in
    --resume)
      resume=("--resume")
      if [ $# -gt 1 ] && [[ "$2" != -* ]] && [[ "$2" != *=* ]]; then resume+=("$2"); shift; fi ;;
    --*=*) launcher+=("$1") ;;
    --*)
      launcher+=("$1")
      if [ $# -gt 1 ] && [[ "$2" != -* ]] && [[ "$2" != *=* ]]; then launcher+=("$2"); shift; fi ;;
    *=*) program+=("$1") ;;
    *) echo "launch.sh: unexpected argument '$1' (launcher flags start with --, overrides look like key=value)" >&2; exit 2 ;;
  esac
  shift
done

if ! "$bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  # The CPU accelerator starts one rank unless told otherwise; LOCAL_SIZE carries --num_gpus to it.
  ranks=1
  for ((i = 0; i < ${#launcher[@]}; i++)); do
    case "${launcher[$i]}" in
      --num_gpus) ranks=${launcher[$((i + 1))]} ;;
      --num_gpus=*) ranks=${launcher[$i]#--num_gpus=} ;;
    esac
  done
  export LOCAL_SIZE=$ranks
  cores=$(nproc)
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / ranks > 0 ? cores / ranks : 1 ))}
fi

cd "$root"
exec "$bin/deepspeed" "${launcher[@]}" --no_local_rank --module sift_llm.cli train "$config" "${program[@]}" "${resume[@]}"
