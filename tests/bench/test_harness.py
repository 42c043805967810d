"""The bench end to end on tiny shapes: every part runs and bench.json, bench.md and bench.png hold what they should."""

from __future__ import annotations

import json

import pytest
import yaml

from sift_llm.cli import main

ROWS = [{"instruction": f"Say the number {n}.", "input": "", "output": f"The answer is {n}."} for n in range(12)]

TINY_STACK = ["layer_stack.enabled=true", "layer_stack.hidden=32", "layer_stack.intermediate=64", "layer_stack.heads=4",
              "layer_stack.layers=1", "layer_stack.seq=8", "layer_stack.dtype=float32", "layer_stack.warmup_steps=0",
              "layer_stack.timed_steps=1", "layer_stack.forced_paths=[sampled]", "kernels.out_features=48",
              "kernels.in_features=32", "kernels.tokens=8", "kernels.densities=[0.01,0.2]", "kernels.repeats=1"]


def read(out):
    return json.loads((out / "bench.json").read_text()), (out / "bench.md").read_text()


def test_layer_stack_and_kernels_write_json_markdown_and_png(tmp_path):
    out = tmp_path / "out"
    assert main(["bench", "--only", "layer_stack,kernels", "--output", str(out), "benchmarks/gpu.yaml", *TINY_STACK]) == 0
    results, text = read(out)
    stack = results["parts"]["layer_stack"]
    labels = [row["label"] for row in stack["rows"]]
    assert labels == ["sift-0.5%", "sift-1%", "sift-5%", "sift-1% (sampled dW)", "sift-1% (before: copy + dense dW)",
                      f"lora-r{stack['lora_rank']}", "full"]
    for row in stack["rows"]:
        assert row["step_time_s"] > 0 and row["peak_bytes"] > 0 and row["state_bytes"] > 0
    sift = stack["rows"][1]
    assert sift["trainable"] == stack["sift_counts"]["1%"] and sift["selection_s"] > 0
    assert sift["state_bytes"] == sift["trainable"] * (4 + 8 + 4)  # fp32 values + Adam moments + int32 index
    kernels = results["parts"]["kernels"]
    assert [row["density"] for row in kernels["rows"]] == [0.01, 0.2]
    assert all(row["dense_dw_s"] > 0 and row["sampled_dw_s"] > 0 for row in kernels["rows"])
    assert "### LLaMA-7B shapes on a GPU" in text and "### Targets" in text and "layer stack (cpu)" in text
    assert (out / "bench.png").stat().st_size > 1000

    # --report-only rewrites the report from bench.json without running anything
    (out / "bench.md").unlink()
    assert main(["bench", "benchmarks/gpu.yaml", "--report-only", "--output", str(out)]) == 0
    assert (out / "bench.md").read_text() == text


def test_unknown_part_is_a_user_error(tmp_path, capsys):
    assert main(["bench", "benchmarks/gpu.yaml", "--only", "speed", "--output", str(tmp_path)]) == 2
    assert "unknown part 'speed'" in capsys.readouterr().err


@pytest.mark.slow
def test_cost_and_quality_through_the_trainer(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "data": {"path": str(corpus)},
        "train": {"learning_rate": 0.01, "warmup_ratio": 0.0, "lr_scheduler": "constant"},
    }))
    out = tmp_path / "out"
    overrides = [
        f"work_dir={tmp_path / 'work'}", "cost.model.hidden=32", "cost.model.intermediate=64", "cost.model.layers=2",
        "cost.model.heads=4", "cost.model.kv_heads=2", f"cost.model.tokenizer={tiny_model_dir}", f"cost.data={corpus}",
        "cost.max_length=96", "cost.warmup_steps=1", "cost.timed_steps=2", "cost.rounds=1", "cost.sift_densities=[0.05]",
        "cost.lora_match_density=0.05", "cost.before_kernels_density=0.05", "cost.probe_layers=1",
        "cost.sift_global_densities=[]",
        f"quality.experiment={experiment}", "quality.steps=2", "quality.micro_batch_size=2", "quality.max_length=96",
        "quality.validation_size=4", "quality.eval_every=1", "quality.sift_densities=[0.05]",
        "quality.lora_match_densities=[0.05]", "quality.sift_lr=0.01", "quality.lora_lr=0.01", "quality.full_lr=0.01",
        "quality.extra_full_lrs=[]", "quality.extra_lora_lrs=[]",
    ]
    assert main(["bench", "--only", "cost,quality", "--output", str(out), "benchmarks/cpu.yaml", *overrides]) == 0
    results, text = read(out)

    cost = results["parts"]["cost"]
    rows = {row["label"]: row for row in cost["rows"]}
    assert list(rows) == ["sift-5%", "sift-5% (before)", next(l for l in rows if l.startswith("lora-r")), "full"]
    sift = rows["sift-5%"]
    assert sift["trainable"] == sift["selection"]["selected"]
    assert len(sift["step_times_s"]) == 2 and all(t > 0 for t in sift["step_times_s"])
    assert all(len(row["peak_rss_bytes_per_rank"]) == 2 and row["peak_rss_bytes"] > 0 for row in rows.values())
    # ZeRO-2 all-reduces the values' fp32 gradients (plus a 4-byte norm) and all-gathers the updated values
    assert sift["collective_bytes"]["all_reduce"] == pytest.approx(4 * sift["trainable"], abs=64)
    assert rows["full"]["collective_bytes"]["all_reduce"] > 10 * sift["collective_bytes"]["all_reduce"]
    assert sift["selection"]["wall_s"] > 0 and sift["selection"]["peak_rss_bytes"] > 0
    probe = {row["label"]: row for row in cost["state_probe"]["rows"]}
    assert probe["sift-5%"]["index_bytes_per_trainable"] == 4
    assert probe["full"]["state_bytes_per_trainable"] == pytest.approx(16)  # fp32 param + fp32 master + Adam

    quality = results["parts"]["quality"]
    assert [row["method"] for row in quality["rows"]] == ["sift", "lora", "full"]
    assert quality["base"]["examples"] == 4 and quality["base"]["eval_loss"] > 0
    for row in quality["rows"]:
        assert [step for step, _ in row["eval_curve"]] == [1, 2]
    assert "### Quality" in text and "share of full's reduction" in text and "### Cost" in text
    assert (out / "bench.png").stat().st_size > 1000
