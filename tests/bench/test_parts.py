"""The memory and selection bench parts on tiny shapes, the targets read from the bench YAML, the report's
kernel columns, and the CLI's list of parts."""

from __future__ import annotations

import json

import pytest

from sift_llm.bench.config import PARTS, load_bench_config
from sift_llm.bench.memory import fit, largest_model
from sift_llm.bench.report import kernels_section
from sift_llm.bench.targets import MEASURES, cost_targets, evaluate
from sift_llm.cli import main
from sift_llm.schema import ConfigError

ROWS = [{"instruction": f"Say the number {n}.", "input": "", "output": f"The answer is {n}."} for n in range(12)]
TINY_SHAPE = ["hidden=32", "intermediate=64", "heads=4", "kv_heads=2"]


def read(out):
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_the_limits_come_from_the_bench_yaml_not_the_library():
    rows = [{"label": "sift-1%", "method": "sift", "peak_rss_bytes": 3.0, "step_time_s": 1.0, "trainable": 10},
            {"label": "lora-r1", "method": "lora", "peak_rss_bytes": 3.0, "step_time_s": 1.0}]
    assert cost_targets(rows, "cpu", "sift-1%") == []  # no limits given: ratios only, no targets
    limits = load_bench_config("benchmarks/cpu.yaml").targets
    assert set(limits) <= set(MEASURES) and limits["memory_vs_lora"] == pytest.approx(1.10)
    (memory,) = [t for t in cost_targets(rows, "cpu", "sift-1%", limits=limits) if t["name"] == "memory_vs_lora"]
    assert memory["met"] is True and memory["target"] == "sift-1% peak memory <= 1.1x LoRA"
    stricter = load_bench_config("benchmarks/cpu.yaml", ["targets.memory_vs_lora=0.9"]).targets
    (memory,) = [t for t in cost_targets(rows, "cpu", "sift-1%", limits=stricter) if t["name"] == "memory_vs_lora"]
    assert memory["met"] is False and memory["limit"] == 0.9
    # bench.json carries the YAML's limits; evaluate reads them from there
    assert evaluate({"targets": {}, "parts": {"cost": {"rows": rows}}}) == []
    with pytest.raises(ConfigError, match="unknown target 'speed'"):
        load_bench_config("benchmarks/cpu.yaml", ["targets.speed=1.0"])
    assert load_bench_config("benchmarks/gpu.yaml").targets == limits


def test_selection_targets_per_sift_row_time_and_memory():
    limits = {"selection_time": 2.0, "selection_memory": 1.0}
    rows = [{"label": "sift-1%", "method": "sift", "peak_rss_bytes": 10, "step_time_s": 1.0,
             "round_step_time_s": [1.0, 2.0], "selection_s": 3.0, "round_selection_s": [1.5, 5.0], "selection_peak": 9},
            {"label": "sift-5%", "method": "sift", "peak_rss_bytes": 10, "step_time_s": 1.0, "selection_s": 2.5,
             "selection_peak": 11},
            {"label": "sift-1% (global)", "method": "sift", "peak_rss_bytes": 10, "step_time_s": 1.0, "selection_s": 9}]
    targets = {(t["name"], t["target"].split()[0]): t for t in cost_targets(rows, "cpu", "sift-1%", limits=limits)}
    assert targets[("selection_time", "sift-1%")]["measured"] == pytest.approx((1.5 + 2.5) / 2)  # per-round ratios
    assert targets[("selection_time", "sift-5%")]["met"] is False
    assert targets[("selection_memory", "sift-1%")]["met"] and not targets[("selection_memory", "sift-5%")]["met"]
    assert all(label != "sift-1% (global)" for _, label in targets)  # scope variants are rows, not targets


def test_kernel_table_shows_the_triton_columns_where_measured():
    row = {"density": 0.01, "dense_dw_s": 2e-3, "sampled_dw_s": 1e-3, "pass_before_s": 5e-3, "pass_after_s": 4e-3,
           "pass_frozen_s": 3e-3, "triton_dw_s": None, "inc_triton_s": None, "inc_csr_s": 1e-3, "linear_s": 5e-4}
    part = {"device": "cpu", "dtype": "float32", "shape": [64, 32], "tokens": 8, "rows": [row]}
    text = "\n".join(kernels_section(part))
    assert "x@S^T CSR (ms)" in text and "triton dW" not in text
    gpu = {**part, "rows": [{**row, "triton_dw_s": 5e-4, "inc_triton_s": 2.5e-4, "pass_triton_s": 3e-3}]}
    text = "\n".join(kernels_section(gpu))
    assert "| triton dW (ms) | triton speed-up |" in text and "| 0.50 | 4.00 |" in text and "pass triton (ms)" in text


def test_memory_fit_and_largest_model():
    fixed, slope = fit([(100, 1100), (300, 1500)])
    assert (fixed, slope) == (pytest.approx(900), pytest.approx(2.0))
    assert largest_model(fixed, slope, budget=4000, ranks=2, cuda=False) == pytest.approx((2000 - 900) / 2)
    assert largest_model(fixed, slope, budget=4000, ranks=2, cuda=True) == pytest.approx((4000 - 900) / 2)
    assert fit([(100, 1)]) is None


def test_cli_lists_every_part(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    help_text = "".join(capsys.readouterr().out.split())  # argparse wraps the list anywhere
    assert f"({','.join(PARTS)})" in help_text and "packing" in PARTS and "memory" in PARTS and "selection" in PARTS


def test_selection_part_compares_scopes_and_versions(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    overrides = [f"work_dir={tmp_path / 'work'}", *(f"selection.model.{o}" for o in TINY_SHAPE),
                 "selection.model.layers=2", f"selection.model.tokenizer={tiny_model_dir}", "selection.max_length=16",
                 "selection.rounds=2", "selection.versions={current: ., again: .}", "selection.rounds_per_version={again: 1}"]
    assert main(["bench", "--only", "selection", "--output", str(out), "benchmarks/cpu.yaml", *overrides]) == 0
    results, text = read(out)
    part = results["parts"]["selection"]
    assert [(r["version"], r["scope"], r["density"]) for r in part["rows"]] == [
        (v, s, d) for v in ("current", "again") for d in (0.01, 0.05) for s in ("per_matrix", "global")]
    assert len(part["versions"]["current"]["runs"]) == 8 and len(part["versions"]["again"]["runs"]) == 4
    for row in part["rows"]:
        assert row["wall_s"] >= row["selector_s"] > 0 and row["peak_rss_bytes"] > 0 and row["selected"] > 0
    assert "### Selection pass: global vs per-matrix scope" in text and "| again | global | 5% |" in text


@pytest.mark.slow
def test_memory_part_through_the_trainer(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    zero3 = json.loads(open("ds_configs/zero3.json").read())
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny model's weights
    (tmp_path / "zero3.json").write_text(json.dumps(zero3))
    out = tmp_path / "out"
    overrides = [f"work_dir={tmp_path / 'work'}", *(f"memory.model.{o}" for o in TINY_SHAPE),
                 f"memory.model.tokenizer={tiny_model_dir}", "memory.layer_counts=[1,3]", "memory.models=[]",
                 f"memory.data={corpus}", "memory.max_length=64", "memory.steps=1", "memory.density=0.05",
                 f"memory.deepspeed_configs=[ds_configs/zero2.json,{tmp_path / 'zero3.json'}]", "memory.budget_gib=24"]
    assert main(["bench", "--only", "memory", "--output", str(out), "benchmarks/cpu.yaml", *overrides]) == 0
    results, text = read(out)
    part = results["parts"]["memory"]
    assert [(r["model"].split()[-2], r["ds"]["stage"]) for r in part["rows"]] == [
        ("(1", 2), ("(1", 3), ("(3", 2), ("(3", 3)]
    for row in part["rows"]:
        for phase in ("load_peak", "selection_peak", "steps_peak", "whole_life_rss", "resident_parameter_elements"):
            assert len(row[phase]) == 2 and all(v > 0 for v in row[phase]), phase
        assert row["peak"] == max(row["peak_per_rank"]) >= max(row["whole_life_rss"])
    # ZeRO-3 holds a partition of the (large) parameters; ZeRO-2 every parameter on every rank
    zero2, zero3 = part["rows"][2], part["rows"][3]
    assert zero2["resident_parameter_elements"][0] == zero2["parameters"]
    assert zero3["resident_parameter_elements"][0] < zero3["parameters"]
    assert all("bytes_per_parameter" in f for f in part["fits"]) and part["budget_bytes"] == 24 * 2**30
    assert "### Memory per rank: ZeRO-2 vs ZeRO-3 vs ZeRO-3 with offload" in text and "Largest trainable model" in text
