"""The packing bench part end to end on a tiny model: two trainer runs through launch.sh, packed and padded."""

import json
import random

import pytest
import yaml

from sift_llm.cli import main

pytestmark = pytest.mark.slow


def test_packed_and_padded_runs_report_tokens_padding_and_held_out_loss(tmp_path, tiny_model_dir):
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog answer is".split()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({
        "instruction": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 10))), "input": "",
        "output": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 40))),
    }) + "\n" for _ in range(80)))
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)}, "data": {"path": str(corpus)},
        "method": {"name": "sift", "sift": {"density": 0.1}}, "train": {"learning_rate": 0.01}}))
    out = tmp_path / "out"
    assert main(["bench", "benchmarks/cpu.yaml", f"packing.experiment={experiment}", "packing.max_length=256",
                 "packing.steps=4", "packing.warmup_steps=1", "packing.validation_size=8", f"work_dir={tmp_path / 'work'}",
                 "--only", "packing", "--output", str(out)]) == 0
    part = json.loads((out / "bench.json").read_text())["parts"]["packing"]
    padded, packed = part["rows"]
    assert (padded["label"], packed["label"]) == ("padded", "packed")
    assert packed["padding_share"] < padded["padding_share"] and padded["padding_share"] > 0.2
    assert packed["packing"]["examples_per_sequence"] > 1.5
    # about the same token budget, and both evaluated on the same (unpacked) validation examples
    assert abs(packed["tokens"] - padded["tokens"]) / padded["tokens"] < 0.35
    assert packed["step0_eval_loss"] == pytest.approx(padded["step0_eval_loss"], abs=1e-5)
    assert all(row["tokens_per_s"] > 0 and row["eval_loss"] > 0 for row in part["rows"])
    assert part["tokens_per_s_ratio"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"])
    assert "### Packing: packed vs padded through the trainer" in (out / "bench.md").read_text()
