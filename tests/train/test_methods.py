"""Full fine-tuning, LoRA and merged SIFT exports from the same trainer (one process each)."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from train_support import REPO, metrics

pytestmark = pytest.mark.slow


def train(config, *args):
    return subprocess.run([sys.executable, "-m", "sift_llm.cli", "train", str(config), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_fine_tuning_writes_a_loadable_trained_model(make_config, tiny_model_dir):
    config = make_config("full", method={"name": "full"}, train={"learning_rate": 0.003})
    result = train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = config.parent / "full"
    losses = [m["loss"] for m in metrics(run_dir) if "loss" in m]
    assert losses[-1] < losses[0]
    tuned = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for (n, p), q in zip(tuned.named_parameters(), base.parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(base.parameters()))  # every tensor trained, embeddings and norms included


def test_lora_run_saves_a_peft_adapter(make_config, tiny_model_dir):
    from peft import PeftModel

    config = make_config("lora", method={"name": "lora", "lora": {"r": 4, "alpha": 8}})
    result = train(config)
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = config.parent / "lora" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = _logits(base, ids)
    tuned = PeftModel.from_pretrained(base, adapter)
    assert not torch.allclose(_logits(tuned, ids), before)
    losses = [m["loss"] for m in metrics(config.parent / "lora") if "loss" in m]
    assert losses[-1] < losses[0]


def test_sift_merged_export_matches_the_adapter_in_memory(make_config, tiny_model_dir):
    from sift_llm.sift import load_adapter

    config = make_config("merged", train={"save_merged": True})
    assert train(config).returncode == 0
    run_dir = config.parent / "merged"
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    load_adapter(in_memory, run_dir / "adapter")  # sparse-increment layers, not merged
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    assert torch.allclose(_logits(merged, ids), _logits(in_memory, ids), atol=1e-5)


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(make_config):
    config = make_config("diverge", train={"learning_rate": 1.0e30, "max_steps": 8, "save_every": 1})
    result = train(config)
    assert result.returncode == 2
    assert "the loss became" in result.stderr and "last good checkpoint is" in result.stderr
    run_dir = config.parent / "diverge"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest / "meta.json").is_file()
    assert not (run_dir / "adapter").exists()
