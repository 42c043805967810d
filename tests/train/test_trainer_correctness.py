"""The trainer where real runs go: training mode on resume and without a validation split, the loss and the
SIFT selection token-weighted over the whole optimizer batch, and checkpoints that are never poisoned."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train_support import REPO, free_port, metrics

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("probe_run.py")

# Answers of very different lengths: a micro-batch mean would weigh a 3-token answer like a 60-token one.
UNEVEN = [
    {"instruction": f"Say the number {n}.", "input": "", "output": f"{n}."} if n % 2 else
    {"instruction": f"Count from {n}.", "input": "", "output": " ".join(str(n + i) for i in range(30))}
    for n in range(16)
]


def probe(config: Path, out: Path, *args: str, ranks: int = 1, env: dict | None = None) -> dict:
    """Run tests/train/probe_run.py (under torchrun for several ranks); the probe's observations."""
    if ranks == 1:
        command = [sys.executable, str(PROBE), str(config), str(out), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(PROBE), str(config),
                   str(out), *args]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests"), **(env or {})}
    result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return json.loads(out.read_text())


def assert_trained_with_checkpointing(steps: list[dict], expected_steps: list[int]) -> None:
    assert [s["step"] for s in steps] == expected_steps
    for s in steps:
        assert s["training"] == [True] * s["micro_batches"], s
        # Recomputed activations: every decoder layer runs its forward again in backward.
        assert s["layer_calls"] == [2 * s["micro_batches"]] * len(s["layer_calls"]), s


def test_a_run_without_validation_trains_in_training_mode_with_checkpointing(make_config, tmp_path):
    config = make_config("noval", data={"validation_size": 0}, model={"gradient_checkpointing": True},
                         train={"max_steps": 3, "gradient_accumulation_steps": 2})
    steps = probe(config, tmp_path / "probe.json")["steps"]
    assert_trained_with_checkpointing(steps, [1, 2, 3])


def test_a_resumed_run_trains_in_training_mode_with_checkpointing(make_config, tmp_path):
    config = make_config("resumed", model={"gradient_checkpointing": True}, train={"max_steps": 2})
    probe(config, tmp_path / "first.json")
    steps = probe(config, tmp_path / "resumed.json", "--resume", "train.max_steps=4")["steps"]
    assert_trained_with_checkpointing(steps, [3, 4])


@pytest.fixture
def uneven_run(make_config, tmp_path):
    """SIFT, 2 ranks x 2 micro-batches of one example, one step, on answers of very different lengths."""
    corpus = tmp_path / "uneven.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in UNEVEN))
    config = make_config("uneven", data={"path": str(corpus), "validation_size": 0},
                         train={"max_steps": 1, "micro_batch_size": 1, "gradient_accumulation_steps": 2})
    observed = probe(config, tmp_path / "probe.json", ranks=2)
    return config.parent / "uneven", observed["steps"][0]


def _first_batch(run_dir: Path):
    """The four examples of step 1 (ranks 0 and 1, micro-batches 0 and 1), rebuilt as the trainer orders them."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from sift_llm.config import load_config
    from sift_llm.train.batches import BatchPlan

    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "train_summary.json").read_text())
    train = load_from_disk(str(Path(summary["dataset"]) / "dataset"))["train"]
    pad = AutoTokenizer.from_pretrained(cfg.model.path).pad_token_id
    plans = [BatchPlan(train, 1, rank, 2, cfg.seed) for rank in range(2)]
    return cfg, [plan.batch(position, pad) for plan in plans for position in range(2)]


def _attached_base(cfg, run_dir: Path):
    """The base model with SIFT attached at the run's selected positions (values zero)."""
    from transformers import AutoModelForCausalLM

    from sift_llm.sift import attach_sift

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    handle = attach_sift(model, cfg.method.sift)
    saved = load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))
    handle.apply_increment({name: (saved[f"{name}.indices"], torch.zeros(saved[f"{name}.indices"].numel()))
                            for name in handle.layers})
    return model, handle


def _summed_token_loss(model, batch) -> torch.Tensor:
    return model(**batch, num_items_in_batch=1).loss  # sum over the batch's learned tokens


def test_the_step_gradient_is_the_token_weighted_mean_over_ranks_and_micro_batches(uneven_run):
    run_dir, step = uneven_run
    cfg, batches = _first_batch(run_dir)
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    assert max(tokens) > 5 * min(tokens), tokens  # the data really is uneven
    model, handle = _attached_base(cfg, run_dir)
    total = sum(_summed_token_loss(model, b) for b in batches) / sum(tokens)
    total.backward()
    reference = {f"{name}.values": layer.values.grad.clone() for name, layer in handle.layers.items()}

    # The micro-batch mean averaged over micro-batches and ranks, as before: a different gradient.
    for layer in handle.layers.values():
        layer.values.grad = None
    (sum(_summed_token_loss(model, b) / t for b, t in zip(batches, tokens)) / len(batches)).backward()
    mean_of_means = {f"{name}.values": layer.values.grad for name, layer in handle.layers.items()}

    worst = max(float((torch.tensor(step["grads"][n]) - reference[n]).abs().max()) for n in reference)
    scale = max(float(g.abs().max()) for g in reference.values())
    gap = max(float((mean_of_means[n] - reference[n]).abs().max()) for n in reference)
    print(f"\nmax |DeepSpeed - token-weighted reference| = {worst:.3g}; mean-of-means differs by {gap:.3g} "
          f"(largest gradient entry {scale:.3g})")
    assert worst <= 1e-6 * max(1.0, scale)
    assert gap > 1e-3 * scale  # the test discriminates between the two weightings
    assert step["loss"] == pytest.approx(float(total.detach()), rel=1e-6)  # the logged loss is the same quantity
    assert metrics(run_dir)[0]["loss"] == pytest.approx(float(total.detach()), rel=1e-6)


def test_the_selection_scores_the_whole_first_batch_like_one_process(uneven_run):
    from sift_llm.sift import attach_sift
    from sift_llm.train.batches import collate

    run_dir, _ = uneven_run
    cfg, batches = _first_batch(run_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    handle = attach_sift(model, cfg.method.sift)
    pad = AutoTokenizer.from_pretrained(cfg.model.path).pad_token_id
    examples = [{"input_ids": b["input_ids"][0][b["attention_mask"][0].bool()].tolist(),
                 "labels": b["labels"][0][b["attention_mask"][0].bool()].tolist()} for b in batches]
    together = collate(examples, pad)
    tokens = int((together["labels"][:, 1:] != -100).sum())
    selector = handle.selector()
    with selector.calibrating():
        model(**together, num_items_in_batch=tokens).loss.backward()
    selector.finalize()
    saved = load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))
    for name, layer in handle.layers.items():
        assert torch.equal(saved[f"{name}.indices"].long(), layer.indices.long()), name
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["micro_batches"] == 2 and selection["ranks"] == 2


def test_zero3_partition_padding_is_not_taken_for_a_non_finite_value(make_config, tmp_path):
    """ZeRO-3 pads each partitioned tensor to a multiple of the ranks with uninitialised memory; a NaN there is
    no trained value, so the checkpoint check must not stop on it (it did: 1 in 5 suite runs, bf16 ZeRO-3)."""
    config = make_config("padded", deepspeed={"config": "ds_configs/zero3.json",
                                              "overrides": {"zero_optimization": {"stage3_param_persistence_threshold": 0}}},
                         train={"max_steps": 2, "save_every": 1, "keep_last": 5, "precision": "bf16"})
    steps = probe(config, tmp_path / "probe.json", "--poison-padding", ranks=2)["steps"]
    assert [s["step"] for s in steps] == [1, 2]
    assert all(sum(s["poisoned_padding"]) > 0 for s in steps), steps  # some partition really was padded
    root = config.parent / "padded" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000001", "step-0000002"]
    values = load_file(str(config.parent / "padded" / "adapter" / "sift_adapter.safetensors"))
    assert all(torch.isfinite(v).all() for k, v in values.items() if k.endswith(".values"))


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_a_nan_gradient_stops_the_run_before_it_is_saved(make_config, clip):
    config = make_config("poisoned", train={"max_steps": 5, "save_every": 1, "keep_last": 5, "max_grad_norm": clip})
    result = subprocess.run([sys.executable, "-m", "sift_llm.cli", "train", str(config)], cwd=REPO,
                            env={**os.environ, "SIFT_LLM_NAN_GRAD_AT": "3", "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "at step 3; stopping without saving" in result.stderr, result.stderr[-3000:]
    assert "last good checkpoint is" in result.stderr and "step-0000002" in result.stderr
    root = config.parent / "poisoned" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step-0000002"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000001", "step-0000002"]
    assert [m["step"] for m in metrics(config.parent / "poisoned") if "loss" in m] == [1, 2]
