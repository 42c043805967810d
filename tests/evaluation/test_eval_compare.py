"""scripts/compare.sh: SIFT, LoRA at SIFT's parameter count and full fine-tuning, one comparison report."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml
from eval_helpers import REPO, write_experiment

pytestmark = pytest.mark.slow


def test_compare_trains_three_methods_on_the_same_data_and_reports_them(tmp_path, tiny_model_dir, tiny_task_dir):
    config = write_experiment(tmp_path, tiny_model_dir, train={"max_steps": 2},
                              eval_section={"tasks": ["tiny_mc"], "include_paths": [str(tiny_task_dir)],
                                            "batch_size": 4, "samples": 1, "max_new_tokens": 4})
    out = tmp_path / "cmp"
    result = subprocess.run(["bash", str(REPO / "scripts" / "compare.sh"), "--config", str(config), "--out", str(out)],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=1500)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report' / 'report.md'}"

    configs = {m: yaml.safe_load((out / m / "config.yaml").read_text()) for m in ("sift", "lora", "full")}
    assert [c["method"]["name"] for c in configs.values()] == ["sift", "lora", "full"]
    lora = configs["lora"]["method"]["lora"]
    assert lora["alpha"] == 2 * lora["r"] and configs["full"]["train"]["learning_rate"] == 2.0e-5
    # same data, steps and batch for all three
    for key in ("data", "seed"):
        assert configs["sift"][key] == configs["lora"][key] == configs["full"][key]
    assert {(c["train"]["max_steps"], c["train"]["micro_batch_size"]) for c in configs.values()} == {(2, 2)}
    # LoRA's rank matches SIFT's parameter count as closely as a rank can
    from transformers import AutoModelForCausalLM

    from sift_llm.bench.common import lora_count, matching_lora_rank, sift_count, target_shapes

    shapes = target_shapes(AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert lora["r"] == matching_lora_rank(shapes, 0.1)
    assert abs(lora_count(shapes, lora["r"]) - sift_count(shapes, 0.1)) <= lora_count(shapes, 1)

    text = (out / "report" / "report.md").read_text()
    assert "| Held-out responses | N | base | sift | lora | full | Δ sift | Δ lora | Δ full |" in text
    assert "| Task | N | base (%) | sift (%) | lora (%) | full (%) |" in text
    summary = json.loads((out / "report" / "eval_summary.json").read_text())
    assert [c["label"] for c in summary["columns"]] == ["base", "sift", "lora", "full"]
    assert set(summary["rows"][0]["delta"]) == {"sift", "lora", "full"}
    for name in ("eval_accuracy.png", "training_curves.png", "samples.json"):
        assert (out / "report" / name).stat().st_size > 0
    assert "reusing cached results" in result.stdout  # the base is evaluated once
