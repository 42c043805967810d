"""bench.md and bench.png from synthetic results hold every part's table and the targets."""

from __future__ import annotations

from sift_llm.bench.config import load_bench_config
from sift_llm.bench.report import render_markdown, write_report


def synthetic_results() -> dict:
    cost_rows = [
        {"label": "sift-1%", "method": "sift", "trainable": 1000, "peak_rss_bytes": 2 << 30, "step_time_s": 1.0,
         "tokens_per_s": 128.0, "collective_bytes": {"all_reduce": 4004, "all_gather_into_tensor": 4000},
         "selection": {"wall_s": 1.5, "peak_rss_bytes": 1 << 30, "grad_sq_share": 0.2}},
        {"label": "lora-r4", "method": "lora", "trainable": 1100, "peak_rss_bytes": 2 << 30, "step_time_s": 0.9,
         "tokens_per_s": 140.0, "collective_bytes": {"all_reduce": 4400}},
        {"label": "full", "method": "full", "trainable": 10**6, "peak_rss_bytes": 8 << 30, "step_time_s": 1.2,
         "tokens_per_s": 100.0, "collective_bytes": {"all_reduce": 4 * 10**6}},
    ]
    return {"name": "synthetic", "targets": load_bench_config("benchmarks/cpu.yaml").targets, "parts": {
        "cost": {"config": {"lora_match_density": 0.01}, "device_type": "cpu", "ranks": 2, "rows": cost_rows,
                 "model": {"parameters": 3e8, "layers": 16, "hidden": 1024, "intermediate": 2816, "heads": 16,
                           "targeted_entries": 2e8},
                 "deepspeed_config": "ds_configs/zero2.json", "micro_batch_size": 1, "max_length": 128,
                 "timed_steps": 5, "warmup_steps": 3, "rounds": 2, "command": "sift-llm bench x.yaml",
                 "machine": {"cpu_count": 2, "torch": "2.x", "platform": "linux"}},
        "quality": {"base": {"eval_loss": 2.0, "examples": 48}, "experiment": "configs/demo.yaml", "ranks": 2,
                    "micro_batch_size": 4, "max_length": 256, "steps": 24, "rows": [
                        {"label": "sift-1%", "method": "sift", "trainable": 1000, "lr": 2e-4, "eval_loss": 1.7,
                         "eval_curve": [[12, 1.8], [24, 1.7]]},
                        {"label": "full", "method": "full", "trainable": 10**6, "lr": 2e-5, "eval_loss": 1.6,
                         "eval_curve": [[12, 1.7], [24, 1.6]]}]},
        "kernels": {"device": "cpu", "dtype": "float32", "shape": [64, 32], "tokens": 8, "rows": [
            {"density": 0.01, "dense_dw_s": 2e-3, "sampled_dw_s": 1e-3, "pass_before_s": 5e-3, "pass_after_s": 4e-3,
             "pass_frozen_s": 3e-3}]},
    }}


def test_markdown_has_tables_targets_and_command():
    text = render_markdown(synthetic_results())
    assert "Command: `sift-llm bench x.yaml`" in text
    for heading in ("### Targets", "### Cost", "### Quality", "### SIFT layer kernels", "Selection pass"):
        assert heading in text
    assert "sift-1% recovers >= 90% of full fine-tuning's held-out loss reduction | 0.750 | >= 0.9 | **missed**" in text
    assert "| sift-1% | 1.0k | 2.00 GiB | 1.00 | 0.25 |" in text


def test_write_report_writes_markdown_and_png(tmp_path):
    write_report(synthetic_results(), tmp_path)
    assert (tmp_path / "bench.md").read_text().startswith("## Benchmark: synthetic")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_memory_selection_and_quantized_parts_are_drawn(tmp_path):
    import json
    from pathlib import Path

    import matplotlib.pyplot as plt

    from sift_llm.bench.report import render_chart

    results = Path("benchmarks/results/cpu")
    parts = {"quantized": json.loads((results / "bench.json").read_text())["parts"]["quantized"],
             "memory": json.loads((results / "memory" / "bench.json").read_text())["parts"]["memory"],
             "selection": json.loads((results / "selection" / "bench.json").read_text())["parts"]["selection"]}
    for name, part in parts.items():
        height, width = plt.imread(render_chart({"parts": {name: part}}, tmp_path / f"{name}.png")).shape[:2]
        assert (width, height) == (round(6.2 * 110), round(4.6 * 110)), name  # one panel each
    height, width = plt.imread(render_chart({"parts": parts}, tmp_path / "all.png")).shape[:2]
    assert width == round(3 * 6.2 * 110)
