"""The quantized bench part: its plan and experiment configs, the large-model memory table, the report section."""

from __future__ import annotations

import pytest

from sift_llm import schema
from sift_llm.bench.config import load_bench_config
from sift_llm.bench.quantized import LLAMA_SHAPES, experiment, llama_entries, memory_table, plan, quantized_section
from sift_llm.config import ExperimentConfig
from sift_llm.errors import UserError

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30


def test_plan_matches_lora_to_sift_and_experiments_are_valid(tmp_path):
    cfg = load_bench_config(None, [f"work_dir={tmp_path}"])
    variants = plan(cfg, SHAPES)
    assert [v["quantization"] for v in variants] == ["nf4", "nf4", "none"]
    sift, qlora, _ = variants
    assert sift["budget"] == qlora["trainable"] == variants[2]["budget"]  # equal trainable counts
    for variant in variants:
        spec = experiment(cfg, variant)
        built = schema.build(ExperimentConfig, spec)  # a valid experiment config
        assert built.model.quantization == variant["quantization"]
        assert built.method.name == variant["method"] and built.train.max_steps == cfg.quantized.steps
        assert built.train.learning_rate == cfg.quantized.learning_rate and not built.train.save_merged
        if variant["method"] == "sift":
            assert built.method.sift.budget == qlora["trainable"]
        else:
            assert built.method.lora.r == qlora["r"]
    with pytest.raises(UserError, match="nf4 or fp4"):
        plan(load_bench_config(None, ["quantized.quantization=int4"]), SHAPES)


def test_llama_shapes_and_the_memory_table():
    targeted, other = llama_entries(LLAMA_SHAPES["LLaMA-7B"])
    assert targeted + other == pytest.approx(6.74e9, rel=0.01)  # LLaMA-7B's 6.74B parameters
    targeted, other = llama_entries(LLAMA_SHAPES["LLaMA-70B"])
    assert targeted + other == pytest.approx(68.98e9, rel=0.01)
    state = {"bits_per_weight": 4.127, "state_bf16_master_fp32": {"bytes_per_entry": 18.0, "index_bytes_per_entry": 4.0}}
    rows = memory_table(state)
    assert [(r["model"], r["density"]) for r in rows] == [("LLaMA-7B", 0.01), ("LLaMA-7B", 0.05),
                                                          ("LLaMA-70B", 0.01), ("LLaMA-70B", 0.05)]
    for row in rows:
        assert row["total_bytes"] == pytest.approx(row["base_4bit_bytes"] + row["state_bytes"] + row["gradient_bytes"])
        assert row["state_bytes"] == row["trainable"] * 18.0
        assert row["total_bytes"] < row["bf16_base_total_bytes"]
        assert row["qlora_equal_total_bytes"] < row["total_bytes"]  # no index


def test_section_renders_rows_ratios_and_table():
    rows = [
        {"label": "sift-nf4 1%", "quantization": "nf4", "trainable": 1000, "peak_rss_bytes": 1100 * 2**20,
         "step_time_s": 1.1, "eval_loss": 1.50, "step0_eval_loss": 2.0},
        {"label": "qlora-nf4 r3", "quantization": "nf4", "trainable": 990, "peak_rss_bytes": 1000 * 2**20,
         "step_time_s": 1.0, "eval_loss": 1.55},
        {"label": "sift 1% (full-precision base)", "quantization": "none", "trainable": 1000,
         "peak_rss_bytes": 1500 * 2**20, "step_time_s": 0.9, "eval_loss": 1.45},
    ]
    state = {"bits_per_weight": 4.144, "packed_bytes": 50, "quantized_entries": 100,
             "state_fp32": {"bytes_per_entry": 16.0},
             "state_bf16_master_fp32": {"bytes_per_entry": 18.0, "index_bytes_per_entry": 4.0}}
    part = {"experiment": "configs/demo.yaml", "parameters": 134.5e6, "ranks": 2, "deepspeed_config": "ds_configs/zero2.json",
            "micro_batch_size": 4, "max_length": 256, "steps": 24, "learning_rate": 2e-4, "rounds": 1,
            "warmup_steps": 3, "validation_size": 48, "device_type": "cpu", "process_baseline_rss_bytes": 600 * 2**20,
            "rows": rows, "ratios": {"memory": 1.1, "step_time": 1.2, "eval_loss_difference": -0.05,
                                     "memory_above_baseline": 1.25},
            "goals": {"memory": 1.10, "step_time": 1.15}, "state": state, "memory_table": memory_table(state)}
    text = "\n".join(quantized_section(part))
    assert "| sift-nf4 1% | nf4 | 1,000 | 1,100 MiB | 1.100 | 1.100 | 1.100 | 1.5000 | -0.0500 |" in text
    assert "memory **1.100x** (goal <= 1.1x: met)" in text
    assert "step time **1.200x** (goal <= 1.15x: **missed**)" in text
    assert "held-out loss difference **-0.0500** (goal <= 0: met)" in text
    assert text.count("| LLaMA-") == 4 and "4.144 bits per 4-bit weight" in text
