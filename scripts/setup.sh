#!/usr/bin/env bash
# Create the project's virtual environment and install sift-llm into it. Idempotent: a second run only
# compares a stamp and returns. Sourced by demo.sh and test.sh; prints the venv's bin dir on stdout.
#   SIFT_LLM_VENV   where the environment lives (default: .venv in the repo)
#   PYTHON          interpreter used to create it (default: python3)
#   SIFT_LLM_TORCH  torch requirement installed when no torch is importable (default: torch==2.13.0)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${SIFT_LLM_VENV:-$root/.venv}
python=${PYTHON:-python3}
stamp=$venv/.sift-llm-install
want=$(cat "$root/pyproject.toml" "$root/scripts/setup.sh" | sha256sum | cut -c1-16)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import sift_llm" 2>/dev/null; then
  echo "$venv/bin"
  exit 0
fi

# pip's warnings about this machine's unreachable local index mirrors say nothing about the install.
quiet_pip() { grep -v "is ignored: it is neither a file nor a directory" || true; }

{
  if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" 2>/dev/null; then
      echo "setup: creating $venv (reusing the torch installed for $python)"
      "$python" -m venv --system-site-packages "$venv"
    else
      echo "setup: creating $venv"
      "$python" -m venv "$venv"
    fi
  fi
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: installing ${SIFT_LLM_TORCH:-torch==2.13.0}"
    "$venv/bin/python" -m pip install -q "${SIFT_LLM_TORCH:-torch==2.13.0}" 2>&1 | quiet_pip
  fi
  # Pin whatever torch is present so no dependency swaps it for another build (e.g. several GB of CUDA).
  "$venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" 2>/dev/null > "$venv/constraints.txt"
  echo "setup: installing sift-llm and its dependencies (constrained to $(cat "$venv/constraints.txt"))"
  "$venv/bin/python" -m pip install -q -c "$venv/constraints.txt" -e "$root[test]" 2>&1 | quiet_pip
  "$venv/bin/python" -c "import sift_llm, torch, deepspeed, transformers" >/dev/null 2>&1 \
    || { echo "setup: the environment in $venv is incomplete (see pip's output above)"; exit 1; }
  echo "$want" > "$stamp"
} >&2
echo "$venv/bin"
