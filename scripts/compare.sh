#!/usr/bin/env bash
# SIFT vs LoRA vs full fine-tuning on the demo, in one command: the same data, data order, steps, batch and
# token budget (configs/demo.yaml by default), each method trained (2 local ranks, ZeRO-2) and evaluated (held-out
# response likelihood, generation samples, MMLU; the base once, cached), then one comparison report.
#   bash scripts/compare.sh [--config FILE] [--out DIR] [--report DIR] [section.key=value ...]
#     --config FILE  the experiment (default configs/demo.yaml)
#     --out DIR      where the three runs go (default runs/compare); a finished run is reused
#     --report DIR   where the comparison goes (default OUT/report): report.md, eval_accuracy.png,
#                    training_curves.png, eval_summary.json, samples.json
#   SIFT_LLM_RANKS=N   number of local ranks (default 2)
# Methods, at the SIFT paper's recipes: SIFT at the config's density (1%) and lr; LoRA on the same seven
# projections at the rank whose parameter count is nearest SIFT's (alpha = 2 r), same lr; full fine-tuning
# at lr 2e-5. About 40 minutes on 2 CPU cores.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
config=configs/demo.yaml
out=runs/compare
report=
overrides=()
while [ $# -gt 0 ]; do
  case "$1" in
    --config) config=$2; shift ;;
    --out) out=$2; shift ;;
    --report) report=$2; shift ;;
    *=*) overrides+=("$1") ;;
    *) echo "compare.sh: unexpected argument '$1' (see the header of $0)" >&2; exit 2 ;;
  esac
  shift
done
report=${report:-$out/report}
started=$(date +%s)
bin=$(bash scripts/setup.sh)
"$bin/sift-llm" data "$config" ${overrides[@]+"${overrides[@]}"}

rank=$("$bin/python" - "$config" ${overrides[@]+"${overrides[@]}"} <<'EOF'
import sys

from sift_llm import assets
from sift_llm.bench.common import lora_count, matching_lora_rank, sift_count
from sift_llm.bench.cost import model_facts
from sift_llm.config import load_config

cfg = load_config(sys.argv[1], sys.argv[2:])
shapes = model_facts(assets.resolve(cfg.model.path))["shapes"]
r = matching_lora_rank(shapes, cfg.method.sift.density)
print(f"compare: SIFT {cfg.method.sift.density:.2%} trains {sift_count(shapes, cfg.method.sift.density):,} entries; "
      f"LoRA r={r} trains {lora_count(shapes, r):,} parameters", file=sys.stderr)
print(r)
EOF
)

runs=()
for method in sift lora full; do
  case $method in
    sift) args=(method.name=sift) ;;
    lora) args=(method.name=lora "method.lora.r=$rank" "method.lora.alpha=$((2 * rank))") ;;
    full) args=(method.name=full train.learning_rate=2.0e-5) ;;
  esac
  run=$out/$method
  runs+=("$run")
  mark=$(date +%s)
  if [ -f "$run/train_summary.json" ]; then
    echo "== $method: $run is trained; reusing it"
  else
    echo "== train $method"
    # a free master port, and its /dev/shm all-reduce buffers (66 MiB per rank) removed afterwards
    port=$("$bin/python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_*' EXIT
    bash launch.sh "$config" --num_gpus "${SIFT_LLM_RANKS:-2}" --master_port "$port" "name=compare-$method" \
      "output_dir=$run" "${args[@]}" ${overrides[@]+"${overrides[@]}"}
    rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_*
  fi
  echo "== eval $method"
  "$bin/sift-llm" eval "$run"
  echo "== $method: $(( $(date +%s) - mark )) s"
done

"$bin/sift-llm" report "${runs[@]}" --output "$report"
echo "== done in $(( $(date +%s) - started )) s"
awk '/^\|/{shown=1; print; next} shown{exit}' "$report/report.md"
echo "report: $report/report.md"
