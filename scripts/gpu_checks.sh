#!/usr/bin/env bash
# The GPU checks of sift-llm in one call, sized to finish in well under 10 minutes on one H100/H200:
#   env          the Python, torch, CUDA, GPU and triton this run uses (env.json)
#   tests        the kernel and layer tests on the GPU (Triton kernels compiled, not interpreted)
#   kernels      the values' gradient and x @ S^T per path and density on LLaMA-7B shapes, bf16 (kernels.json)
#   layer_stack  4 LLaMA-7B decoder layers: SIFT 0.5/1/5% (auto, forced dense, forced triton) vs LoRA vs full
#                (bench.json, bench.md through `sift-llm bench`)
#   trainer      the real trainer: launch.sh + DeepSpeed ZeRO-2 and ZeRO-3, bf16, one GPU, a random LLaMA with
#                7B-shaped layers (2 layers, 1,024 tokens, gradient checkpointing): SIFT 1% and 5% vs LoRA vs full
#                (trainer_zero2/, trainer_zero3/: bench.json, bench.md)
#   mmlu         the demo trained on the GPU, then base and tuned on all 14,042 MMLU questions (mmlu/: the run
#                with its report.md)
# Results go to benchmarks/results/<gpu>/ (e.g. h200), one log per part under logs/, and a summary at the end.
#
#   bash scripts/gpu_checks.sh                       everything
#   bash scripts/gpu_checks.sh --only kernels,tests  some parts (rerun only what failed: see status.txt)
#   bash scripts/gpu_checks.sh --copy-to "$OUT"      also copy the results folder there (a lent machine's $OUT)
#   bash scripts/gpu_checks.sh --dry-run             tiny shapes, a few seconds per part; runs on a CPU too
#   bash scripts/gpu_checks.sh --list                the parts, in order
# Options: --out DIR (results folder), --python PY (interpreter; default: the first of .venv/bin/python and
# python3 whose torch sees CUDA, else scripts/setup.sh's venv, which needs a package registry). launch.sh (trainer,
# mmlu) always runs scripts/setup.sh's venv, which reuses an installed torch.
#
# Adding a part: write part_<name>() (use run_py for Python entry points, which logs and times out),
# add <name> to PARTS, its import needs to NEEDS and its time limit (seconds) to LIMIT.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

PARTS=(env tests kernels layer_stack trainer mmlu)
declare -A NEEDS=(
  [env]="torch"
  [tests]="torch pytest transformers yaml safetensors"
  [kernels]="torch yaml tqdm safetensors"
  [layer_stack]="torch yaml tqdm safetensors transformers peft matplotlib"
  [trainer]="torch yaml tqdm safetensors transformers peft deepspeed matplotlib"
  [mmlu]="torch yaml transformers peft deepspeed lm_eval matplotlib"
)
declare -A LIMIT=([env]=60 [tests]=240 [kernels]=240 [layer_stack]=300 [trainer]=420 [mmlu]=360)

only="" out="" copy_to="" python="" dry_run=0
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --copy-to) copy_to=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --list) printf '%s\n' "${PARTS[@]}"; exit 0 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "gpu_checks: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

selected=("${PARTS[@]}")
if [ -n "$only" ]; then
  IFS=, read -r -a selected <<< "$only"
  for part in "${selected[@]}"; do
    [ -n "${NEEDS[$part]+x}" ] || { echo "gpu_checks: unknown part '$part'; parts: ${PARTS[*]}" >&2; exit 2; }
  done
fi

has_cuda_torch() { "$1" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
if [ -z "$python" ]; then
  for candidate in "$root/.venv/bin/python" python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_cuda_torch "$candidate"; then python=$candidate; break; fi
  done
fi
if [ -z "$python" ]; then
  if [ "$dry_run" = 1 ] && [ -x "$root/.venv/bin/python" ]; then
    python=$root/.venv/bin/python  # a dry run checks the entry points, on a CPU too
  else
    echo "gpu_checks: no Python whose torch sees CUDA; setting up the venv (needs a package registry)"
    python="$(bash "$root/scripts/setup.sh")/python" || { echo "gpu_checks: setup failed" >&2; exit 1; }
  fi
fi
# sift_llm runs from the checkout whether or not it is installed in that interpreter.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

gpu=$("$python" -c "
import torch
name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'
words = name.lower().replace('nvidia', '').split()
print(words[0] if words else 'gpu')" 2>/dev/null || echo unknown)
if [ "$dry_run" = 1 ]; then
  out=${out:-${TMPDIR:-/tmp}/sift-llm-gpu-checks-dry-run/$gpu}  # a dry run leaves benchmarks/results alone
fi
out=${out:-$root/benchmarks/results/$gpu}
mkdir -p "$out/logs"
status=$out/status.txt
: > "$out/status.new"

missing_modules() {
  "$python" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}

# run_py PART ARGS...: run "$python ARGS" under the part's time limit, appending to its log.
run_py() {
  local part=$1; shift
  timeout --signal=TERM --kill-after=10 "${LIMIT[$part]}" "$python" "$@" >> "$out/logs/$part.log" 2>&1
}

part_env() {
  "$python" - "$out/env.json" >> "$out/logs/env.log" 2>&1 <<'PY'
import importlib.metadata, json, platform, sys
import torch
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}",
                multiprocessors=props.multi_processor_count)
for package in ("triton", "transformers", "peft", "deepspeed", "pytest"):
    try:
        info[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        info[package] = None
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PY
}

part_tests() {
  local args=(-m pytest -q -p no:cacheprovider -rs tests/sift/test_triton_kernels.py tests/sift/test_sift_layer_paths.py
              tests/sift/test_sift_layer.py tests/sift/test_sift_accelerator.py)
  [ "$dry_run" = 1 ] && args=(-m pytest -q -p no:cacheprovider -rs tests/sift/test_triton_kernels.py -k "plan")
  run_py tests "${args[@]}" --junitxml="$out/tests.xml"
}

part_kernels() {
  local args=(-m sift_llm.bench.kernels --out "$out/kernels.json")
  [ "$dry_run" = 1 ] && args+=(--dry-run)
  run_py kernels "${args[@]}"
}

part_layer_stack() {
  # One round of 4 layers, 5 + 10 steps: ~7 variants x ~5 s on an H100 (the README's table used 2 rounds, 8 + 15).
  local overrides=(layer_stack.rounds=1 layer_stack.warmup_steps=5 layer_stack.timed_steps=10 layer_stack.layers=4
                   "layer_stack.forced_paths=[dense,triton]" layer_stack.before_kernels=false)
  if [ "$dry_run" = 1 ]; then
    overrides=(layer_stack.hidden=32 layer_stack.intermediate=64 layer_stack.heads=4 layer_stack.layers=1
               layer_stack.seq=8 layer_stack.dtype=float32 layer_stack.warmup_steps=0 layer_stack.timed_steps=1
               layer_stack.rounds=1 "layer_stack.forced_paths=[dense]" layer_stack.before_kernels=false)
  fi
  run_py layer_stack -m sift_llm.cli bench --only layer_stack --output "$out" benchmarks/gpu.yaml "${overrides[@]}"
}

part_trainer() {
  # One GPU, one round, 3 + 5 steps per method; each DeepSpeed config writes its own bench folder.
  local overrides=(cost.enabled=true cost.ranks=1 "cost.model={hidden: 4096, intermediate: 11008, layers: 2, heads: 32, kv_heads: 32}"
                   cost.max_length=1024 cost.gradient_checkpointing=true cost.warmup_steps=3 cost.timed_steps=5
                   cost.rounds=1 "cost.sift_densities=[0.01, 0.05]" "cost.sift_global_densities=[]"
                   cost.before_kernels_density=null cost.state_probe=false)
  if [ "$dry_run" = 1 ]; then
    overrides=(cost.enabled=true cost.ranks=1 "cost.model={hidden: 64, intermediate: 128, layers: 1, heads: 4, kv_heads: 4}"
               cost.max_length=64 cost.warmup_steps=1 cost.timed_steps=1 cost.rounds=1 "cost.sift_densities=[0.01]"
               "cost.sift_global_densities=[]" cost.before_kernels_density=null cost.state_probe=false cost.full=false
               work_dir="$out.work")  # a dry run leaves runs/bench alone
  fi
  local config
  for config in zero2 zero3; do
    run_py trainer -m sift_llm.cli bench benchmarks/gpu.yaml "${overrides[@]}" cost.deepspeed_config=ds_configs/$config.json \
      --only cost --output "$out/trainer_$config" || return $?
  done
}

part_mmlu() {
  # The demo's training on one GPU, then its eval stage on every MMLU question (eval.limit=null).
  local evaluation=(eval.limit=null)
  [ "$dry_run" = 1 ] && evaluation=(eval.limit=1 eval.samples=1)
  local overrides=(output_dir="$out/mmlu" "${evaluation[@]}")
  [ "$dry_run" = 1 ] && overrides+=(train.max_steps=1)
  local port
  port=$("$python" -c "from sift_llm.runtime import free_port; print(free_port())")
  timeout --signal=TERM --kill-after=10 "${LIMIT[mmlu]}" \
    bash launch.sh configs/demo.yaml --num_gpus 1 --master_port "$port" "${overrides[@]}" >> "$out/logs/mmlu.log" 2>&1 || return $?
  rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$port"_*
  local run_dir
  run_dir=$("$python" -m sift_llm.cli config configs/demo.yaml "${overrides[@]}" --get run_dir) || return $?
  run_py mmlu -m sift_llm.cli eval "$run_dir" "${evaluation[@]}"
}

echo "gpu_checks: $gpu, python $python, results in $out"
failed=()
for part in "${selected[@]}"; do
  missing=$(missing_modules ${NEEDS[$part]})
  if [ -n "$missing" ]; then
    echo "$part skipped missing:$missing" >> "$out/status.new"
    echo "== $part: skipped, missing Python modules: $missing"
    failed+=("$part")
    continue
  fi
  echo "== $part (limit ${LIMIT[$part]} s, log $out/logs/$part.log)"
  : > "$out/logs/$part.log"
  started=$(date +%s)
  "part_$part"
  rc=$?
  seconds=$(( $(date +%s) - started ))
  if [ $rc -eq 0 ]; then result=ok; else result="failed rc=$rc"; failed+=("$part"); fi
  [ $rc -eq 124 ] && result="timed out after ${LIMIT[$part]} s"
  echo "$part $result ${seconds}s" >> "$out/status.new"
  echo "   $result in ${seconds}s"
  [ $rc -eq 0 ] || tail -n 25 "$out/logs/$part.log"
done

# status.txt keeps the latest result of every part, so a rerun of some parts updates only their lines.
if [ -f "$status" ]; then
  grep -v -E "^($(IFS='|'; echo "${selected[*]}")) " "$status" >> "$out/status.new" || true
fi
sort -o "$status" "$out/status.new" && rm -f "$out/status.new"

echo "== summary ($out)"
cat "$status"
"$python" - "$out" <<'PY' 2>/dev/null || true
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
if (out / "kernels.json").is_file():
    from sift_llm.bench.kernels import summarize
    print("\n".join(summarize(json.loads((out / "kernels.json").read_text()))))
bench = out / "bench.json"
if bench.is_file():
    stack = json.loads(bench.read_text())["parts"].get("layer_stack")
    if stack:
        rows = {row["label"]: row for row in stack["rows"]}
        lora = next((r for r in stack["rows"] if r["method"] == "lora"), None)
        full = next((r for r in stack["rows"] if r["method"] == "full"), None)
        print(f"layer stack on {stack['device']} ({stack['shape']}):")
        for label, row in rows.items():
            ratios = "".join(f", x{name} {row['step_time_s'] / ref['step_time_s']:.3f}"
                             for name, ref in (("LoRA", lora), ("full", full)) if ref)
            paths = f", paths {row['values_grad_paths']}" if row.get("values_grad_paths") else ""
            print(f"  {label}: step {row['step_time_s'] * 1e3:.1f} ms{ratios}, peak {row['peak_bytes'] / 2**30:.2f} GiB{paths}")
PY
if [ -n "$copy_to" ]; then
  mkdir -p "$copy_to" && cp -r "$out" "$copy_to/" && echo "gpu_checks: copied $out to $copy_to/"
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_checks: not passed: ${failed[*]} (rerun: bash scripts/gpu_checks.sh --only $(IFS=,; echo "${failed[*]}"))"
  exit 1
fi
echo "gpu_checks: all parts passed"
