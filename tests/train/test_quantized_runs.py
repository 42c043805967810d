"""Training on a 4-bit (NF4) base through launch.sh, 2 CPU ranks: SIFT and QLoRA under ZeRO-2, SIFT under ZeRO-3,
full fine-tuning refused; the saved adapter and the merged export reproduce the trained model's held-out loss."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from train_support import config_writer, launch, launched, metrics  # noqa: E402

pytestmark = pytest.mark.slow

VALIDATION = 4
TRAIN = {"max_steps": 8, "save_merged": True, "eval_every": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Three finished runs on the same NF4 base: sift and lora under ZeRO-2, sift under ZeRO-3."""
    root = tmp_path_factory.mktemp("quantized-runs")
    make = config_writer(root, tiny_model_dir)
    model = {"path": str(tiny_model_dir), "quantization": "nf4"}
    data = {"validation_size": VALIDATION}
    specs = {
        "sift": make("sift", model=model, data=data, train=TRAIN),
        "lora": make("lora", model=model, data=data, train=TRAIN,
                     method={"name": "lora", "lora": {"r": 4, "alpha": 8.0}}),
        "sift-zero3": make("sift-zero3", model=model, data=data, train={**TRAIN, "save_merged": False}, deepspeed={
            "config": "ds_configs/zero3.json",
            "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}}),
    }
    out = {}
    for name, config in specs.items():
        result = launched(config)
        out[name] = {"dir": root / name, "log": result.stdout + result.stderr, "config": config}
    return out


def _evals(run_dir):
    return {m["step"]: m["eval_loss"] for m in metrics(run_dir) if "eval_loss" in m}


def _held_out_loss(model, run_dir) -> float:
    """The trainer's held-out loss (token-weighted over the validation split), recomputed in one process."""
    from transformers import AutoTokenizer

    from sift_llm.data import load_prepared
    from sift_llm.train.batches import BatchPlan
    from sift_llm.train.trainer import learned_tokens

    summary = json.loads((run_dir / "train_summary.json").read_text())
    validation = load_prepared(summary["dataset"])["validation"]
    tokenizer = AutoTokenizer.from_pretrained(summary["base_model"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    plan = BatchPlan(validation, 1, 0, 1, 42, shuffle=False)
    loss_sum, tokens = 0.0, 0
    with torch.no_grad():
        for index in range(plan.micro_batches_per_epoch):
            batch = plan.batch(index, pad)
            loss_sum += float(model(**batch, num_items_in_batch=1).loss)
            tokens += learned_tokens(batch)
    return loss_sum / tokens


@pytest.mark.parametrize("name", ["sift", "lora"])
def test_zero2_run_on_a_4bit_base_learns_and_records_the_quantization(runs, name):
    run = runs[name]
    run_dir = run["dir"]
    assert "model: 4-bit nf4 base" in run["log"] and "ZeRO-2, 2 rank(s)" in run["log"]
    losses = [m["loss"] for m in metrics(run_dir) if "loss" in m]
    assert len(losses) == TRAIN["max_steps"]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    evals = _evals(run_dir)
    assert evals[TRAIN["max_steps"]] < evals[0] - 0.02, evals  # the held-out loss falls
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["quantization"]["quant_type"] == "nf4" and summary["quantization"]["quant_storage"] == "uint8"
    adapter = run_dir / "adapter"
    if name == "sift":
        record = json.loads((adapter / "sift_adapter.json").read_text())["base_model"]["quantization"]
    else:
        record = json.loads((adapter / "sift_llm_quantization.json").read_text())
    assert record["quant_type"] == "nf4" and record["double_quant"] is True and record["dtype"] == "float32"
    merged = json.loads((run_dir / "merged" / "sift_llm_quantization.json").read_text())
    assert merged["merged"] is True
    assert "quantization_config" not in json.loads((run_dir / "merged" / "config.json").read_text())


@pytest.mark.parametrize("name", ["sift", "lora"])
def test_saved_adapter_and_merged_model_reproduce_the_trained_held_out_loss(runs, name, tiny_model_dir):
    """Eval's loader puts the adapter on the 4-bit base in memory (exactly the trained model); the merged
    export (dequantized base + increments, fp32) reproduces it to float rounding."""
    from sift_llm.loading import load_model

    run_dir = runs[name]["dir"]
    trained = _evals(run_dir)[TRAIN["max_steps"]]
    model, _, info = load_model(tiny_model_dir, run_dir / "adapter", device="cpu")
    assert info["scored"].startswith("the 4-bit nf4 base with the")
    assert _held_out_loss(model, run_dir) == pytest.approx(trained, rel=1e-5)
    merged, _, merged_info = load_model(run_dir / "merged", device="cpu")
    assert merged_info["scored"].startswith("the merged model: the dequantized 4-bit nf4 base")
    assert not any(type(m).__name__ in ("Linear4bit", "SiftLinear4bit") for m in merged.modules())
    assert _held_out_loss(merged, run_dir) == pytest.approx(trained, rel=1e-4)


def test_zero3_on_a_4bit_base_trains_the_same_values_as_zero2(runs):
    from safetensors.torch import load_file

    run = runs["sift-zero3"]
    assert "ZeRO-3, 2 rank(s)" in run["log"]
    summary = json.loads((run["dir"] / "train_summary.json").read_text())
    assert summary["quantization"]["quant_storage"] == "float32"  # the documented ZeRO-3 setting
    selection = json.loads((run["dir"] / "selection.json").read_text())
    # ZeRO-3 partitioned the packed 4-bit weights: each rank holds about half of the model's elements.
    assert max(selection["resident_parameter_elements"]) < 0.7 * summary["total_parameter_elements"]
    zero2 = load_file(str(runs["sift"]["dir"] / "adapter" / "sift_adapter.safetensors"))
    zero3 = load_file(str(run["dir"] / "adapter" / "sift_adapter.safetensors"))
    assert zero2.keys() == zero3.keys()
    for key in zero2:
        assert (zero2[key].double() - zero3[key].double()).abs().max() <= 1e-6, key


def test_full_fine_tuning_on_a_4bit_base_is_refused_clearly(runs, tiny_model_dir):
    config = config_writer(runs["sift"]["config"].parent, tiny_model_dir)(
        "full", model={"path": str(tiny_model_dir), "quantization": "nf4"}, method={"name": "full"})
    result = launch(config)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "model.quantization=nf4: full fine-tuning cannot train a 4-bit base" in output
    assert "Traceback" not in output
