"""scripts/gpu_checks.sh, the one call a lent GPU gets: its parts, its refusals, and its dry run on a CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_checks.sh"


def gpu_checks(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_the_parts_cover_every_measurement_the_gpu_owes():
    listed = gpu_checks("--list").stdout.split()
    assert listed == ["env", "tests", "kernels", "layer_stack", "trainer", "mmlu"]
    help_text = gpu_checks("--help").stdout
    assert all(f"#   {part}" in help_text for part in listed) and "set -uo" not in help_text


def test_an_unknown_part_or_argument_is_refused():
    result = gpu_checks("--only", "kernels,nope")
    assert result.returncode == 2 and "unknown part 'nope'" in result.stderr
    assert gpu_checks("--bogus").returncode == 2


@pytest.mark.slow
def test_dry_run_of_the_trainer_part_writes_a_bench_per_deepspeed_config(tmp_path):
    out = tmp_path / "results"
    result = gpu_checks("--dry-run", "--only", "env,trainer", "--out", str(out), "--python", sys.executable)
    assert result.returncode == 0, result.stdout[-3000:] + (out / "logs" / "trainer.log").read_text()[-3000:]
    assert json.loads((out / "env.json").read_text())["torch"]
    for config in ("zero2", "zero3"):
        cost = json.loads((out / f"trainer_{config}" / "bench.json").read_text())["parts"]["cost"]
        assert cost["deepspeed_config"] == f"ds_configs/{config}.json"
        assert {row["method"] for row in cost["rows"]} >= {"sift", "lora"}
    status = [line.split()[:2] for line in (out / "status.txt").read_text().splitlines()]
    assert status == [["env", "ok"], ["trainer", "ok"]]
