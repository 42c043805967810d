#!/usr/bin/env bash
# The test suite, slow multi-process DeepSpeed tests included. Sets up the environment on first run.
# Extra arguments go to pytest (e.g. -m "not slow" for the quick subset).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$(bash "$root/scripts/setup.sh")
cd "$root"
exec "$bin/python" -m pytest -q -p no:cacheprovider "$@"
