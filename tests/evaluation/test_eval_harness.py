"""The harness: in-memory and CLI evaluation agree, adapters are applied, base results are cached."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from eval_helpers import merge_lora

from sift_llm.errors import UserError
from sift_llm import loading
from sift_llm.evaluation import EvalConfig, cli_backend, harness, tasks
from sift_llm.evaluation import results as results_io
from sift_llm.evaluation.config import eval_cache_dir
from sift_llm.schema import ConfigError, build


def _cfg(tiny_task_dir, **extra) -> EvalConfig:
    return build(EvalConfig, {"tasks": ["tiny_mc", "tiny_ll"], "include_paths": [str(tiny_task_dir)],
                              "batch_size": 4, **extra}, "eval")


def _scores(results: dict) -> tuple[float, float]:
    return results["results"]["tiny_mc"]["acc,none"], results["results"]["tiny_ll"]["perplexity,none"]


# ------------------------------------------------------------------------------------------ config


def test_eval_config_defaults_and_validation():
    cfg = build(EvalConfig, {}, "eval")
    assert cfg.tasks == ["mmlu_offline"] and cfg.num_fewshot == 0 and cfg.limit is None
    assert cfg.device == "auto" and cfg.dtype == "auto" and cfg.cache_base is True
    assert build(EvalConfig, {"limit": 0.25, "batch_size": "auto"}, "eval").limit == 0.25
    with pytest.raises(ConfigError, match="eval.limit: 100.0 is a float >= 1"):
        build(EvalConfig, {"limit": 100.0}, "eval")
    with pytest.raises(ConfigError, match="eval.limit: 0 is out of range"):
        build(EvalConfig, {"limit": 0}, "eval")
    with pytest.raises(ConfigError, match="did you mean 'eval.num_fewshot'"):
        build(EvalConfig, {"num_fewshots": 5}, "eval")
    with pytest.raises(ConfigError, match="eval.dtype"):
        build(EvalConfig, {"dtype": "fp8"}, "eval")


def test_device_and_dtype_resolution():
    cpu = loading.resolve_device("cpu")
    assert cpu.type == "cpu"
    assert loading.resolve_dtype("auto", cpu) == torch.float32
    assert loading.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert loading.resolve_device("auto").type in {"cpu", "cuda", "xpu"}
    with pytest.raises(UserError, match="not a device"):
        loading.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA device"):
            loading.resolve_device("cuda")


def test_jsonable_makes_lm_eval_output_serialisable():
    raw = {"a": np.float64(0.5), "b": float("nan"), "c": (1, np.int64(2)), "d": len, "e": torch.float32, 3: None}
    out = results_io.jsonable(raw)
    assert out == {"a": 0.5, "b": None, "c": [1, 2], "d": "builtins.len", "e": "torch.float32", "3": None}
    json.dumps(out, allow_nan=False)


# ------------------------------------------------------------------------------------------ evaluation


@pytest.mark.slow
def test_in_memory_and_cli_paths_agree(tiny_model_dir, tiny_task_dir, lora_adapter_dir, tmp_path):
    """Base: in memory vs the lm_eval CLI. Tuned: LoRA applied in memory vs the merged dir on the CLI."""
    cfg = _cfg(tiny_task_dir)
    base_mem = harness.evaluate_model(tiny_model_dir, cfg, output_path=tmp_path / "base_mem.json")
    base_cli = harness.evaluate_model(tiny_model_dir, dataclasses.replace(cfg, backend="cli"))
    assert base_mem["sift_llm"]["backend"] == "memory" and base_cli["sift_llm"]["backend"] == "cli"
    assert _scores(base_mem)[0] == _scores(base_cli)[0]
    assert _scores(base_mem)[1] == pytest.approx(_scores(base_cli)[1], rel=1e-4)

    merged = merge_lora(tiny_model_dir, lora_adapter_dir, tmp_path / "merged")
    tuned_mem = harness.evaluate_model(tiny_model_dir, cfg, adapter_dir=lora_adapter_dir)
    tuned_cli = harness.evaluate_model(merged, dataclasses.replace(cfg, backend="cli"))
    assert tuned_mem["sift_llm"]["adapter_kind"] == "lora"
    assert _scores(tuned_mem)[0] == _scores(tuned_cli)[0]
    assert _scores(tuned_mem)[1] == pytest.approx(_scores(tuned_cli)[1], rel=1e-4)
    # the adapter really changed the model
    assert not math.isclose(_scores(tuned_mem)[1], _scores(base_mem)[1], rel_tol=1e-3)

    written = json.loads((tmp_path / "base_mem.json").read_text())
    assert written["results"]["tiny_mc"]["acc,none"] == _scores(base_mem)[0]
    assert "samples" not in written and written["sift_llm"]["model"] == str(tiny_model_dir)


def test_cli_path_takes_a_lora_adapter(tiny_model_dir, tiny_task_dir, lora_adapter_dir, tmp_path):
    cfg = _cfg(tiny_task_dir, backend="cli", limit=3)
    cmd = cli_backend.cli_command(tiny_model_dir, cfg, adapter_dir=lora_adapter_dir, device="cpu", dtype="float32",
                              include_dir=tiny_task_dir, output_json=tmp_path / "r.json")
    assert cmd[cmd.index("--model_args") + 1] == f"pretrained={tiny_model_dir},dtype=float32,peft={lora_adapter_dir}"
    assert cmd[cmd.index("--limit") + 1] == "3" and cmd[cmd.index("--tasks") + 1] == "tiny_mc,tiny_ll"
    with pytest.raises(UserError, match="contains a comma"):
        cli_backend.cli_command(tmp_path / "a,b", cfg, adapter_dir=None, device="cpu", dtype="float32",
                            include_dir=tiny_task_dir, output_json=tmp_path / "r.json")


def _trained_sift_adapter(model_dir, directory, **config):
    """A SIFT adapter of the tiny model with random non-zero values; returns (adapter dir, logits of ids)."""
    from transformers import AutoModelForCausalLM

    from sift_llm.sift import SiftConfig, attach_sift, save_adapter

    trained = AutoModelForCausalLM.from_pretrained(model_dir)
    handle = attach_sift(trained, SiftConfig(**{"density": 0.1, **config}))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    selector = handle.selector()
    with selector.calibrating():
        trained(input_ids=ids, labels=ids).loss.backward()
    selector.finalize()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.values.normal_(std=0.05)
        expected = trained(input_ids=ids).logits
    return save_adapter(handle, directory), expected


def test_cli_path_scores_a_sift_adapter_through_its_peft_export(tiny_model_dir, tiny_task_dir, tmp_path, capsys):
    """lm_eval's hf model gets the SIFT adapter as a PEFT supertuning adapter: same scores as in memory."""
    adapter, _ = _trained_sift_adapter(tiny_model_dir, tmp_path / "adapter")
    cfg = _cfg(tiny_task_dir)
    tuned_mem = harness.evaluate_model(tiny_model_dir, cfg, adapter_dir=adapter)
    tuned_cli = harness.evaluate_model(tiny_model_dir, dataclasses.replace(cfg, backend="cli"), adapter_dir=adapter)
    assert "exported to PEFT's supertuning format" in capsys.readouterr().out
    assert tuned_cli["sift_llm"]["backend"] == "cli" and tuned_cli["sift_llm"]["adapter_kind"] == "sift"
    assert _scores(tuned_mem)[0] == _scores(tuned_cli)[0]
    assert _scores(tuned_mem)[1] == pytest.approx(_scores(tuned_cli)[1], rel=1e-4)
    base = harness.evaluate_model(tiny_model_dir, cfg)
    assert not math.isclose(_scores(tuned_cli)[1], _scores(base)[1], rel_tol=1e-3)  # the increments were applied


def test_adapter_is_applied_in_memory(tiny_model_dir, lora_adapter_dir, tiny_tokenizer):
    base, tokenizer, info = loading.load_model(tiny_model_dir, device="cpu")
    tuned, _, tuned_info = loading.load_model(tiny_model_dir, lora_adapter_dir, device="cpu")
    assert info["adapter_kind"] is None and tuned_info["adapter_kind"] == "lora"
    assert info["dtype"] == "float32" and not tuned.training
    ids = tokenizer("The quick brown fox. Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits, atol=1e-4)


def test_sift_adapter_is_applied_and_folded_in_memory(tiny_model_dir, tmp_path):
    from sift_llm.sift import SiftLinear

    adapter, expected = _trained_sift_adapter(tiny_model_dir, tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    model, _, info = loading.load_model(tiny_model_dir, adapter, device="cpu", dtype="float32")
    assert info["adapter_kind"] == "sift"
    assert not any(isinstance(m, SiftLinear) for m in model.modules())  # folded into plain Linear weights
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)


def test_base_results_are_cached(tiny_model_dir, tiny_task_dir, tmp_path, capsys):
    cfg = _cfg(tiny_task_dir, tasks=["tiny_mc"])
    first = harness.evaluate_base(tiny_model_dir, cfg, output_path=tmp_path / "a" / "results.json")
    assert first["sift_llm"]["cached"] is False
    assert "no cached results" in capsys.readouterr().out
    second = harness.evaluate_base(tiny_model_dir, cfg, output_path=tmp_path / "b" / "results.json")
    assert "reusing cached results" in capsys.readouterr().out
    assert second["sift_llm"]["cached"] is True
    assert second["results"] == first["results"]
    assert json.loads((tmp_path / "b" / "results.json").read_text())["sift_llm"]["cached"] is True
    fingerprint = first["sift_llm"]["fingerprint"]
    assert (eval_cache_dir(cfg) / "base" / fingerprint / "results.json").is_file()

    # another limit, or changed model files, is another fingerprint
    other = harness.evaluate_base(tiny_model_dir, _cfg(tiny_task_dir, tasks=["tiny_mc"], limit=2))
    assert other["sift_llm"]["cached"] is False and other["sift_llm"]["fingerprint"] != fingerprint
    copy = tmp_path / "model-copy"
    shutil.copytree(tiny_model_dir, copy)
    assert harness.evaluate_base(copy, cfg)["sift_llm"]["cached"] is True  # same content, other place
    with open(copy / "config.json", "a") as handle:
        handle.write("\n")
    assert harness.evaluate_base(copy, cfg)["sift_llm"]["cached"] is False
    # cache_base false never reads the cache
    assert harness.evaluate_base(tiny_model_dir, _cfg(tiny_task_dir, tasks=["tiny_mc"], cache_base=False))[
        "sift_llm"]["cached"] is False


def test_eval_forces_offline(tiny_model_dir, tiny_task_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    harness.evaluate_model(tiny_model_dir, _cfg(tiny_task_dir, tasks=["tiny_mc"], limit=1))
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE is True


# ------------------------------------------------------------------------------------------ bad input


def test_bad_model_and_adapter_dirs(tiny_model_dir, lora_adapter_dir, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        loading.check_model_dir(tmp_path / "nope")
    with pytest.raises(UserError, match="it holds an adapter"):
        loading.check_model_dir(lora_adapter_dir)
    with pytest.raises(UserError, match="does not exist"):
        loading.detect_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a SIFT adapter"):
        loading.detect_adapter(tmp_path / "empty")
    with pytest.raises(UserError, match="full model directory"):
        loading.detect_adapter(tiny_model_dir)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{oops")
    with pytest.raises(UserError, match="not a valid PEFT adapter config"):
        loading.detect_adapter(broken)


def test_unknown_task_and_include_path(tiny_task_dir, tmp_path):
    with pytest.raises(UserError, match=r"unknown lm-eval task\(s\) 'tiny_mcq' \(did you mean tiny_mc"):
        tasks.build_task_manager(_cfg(tiny_task_dir, tasks=["tiny_mcq"]))
    # lm-eval's own tasks pass through (their data must then be in the local datasets cache)
    manager = tasks.build_task_manager(_cfg(tiny_task_dir, tasks=["mmlu", "tiny_mc"]))
    assert "mmlu" in manager.all_groups and "mmlu_offline" in manager.all_groups
    tasks.check_tasks(_cfg(tiny_task_dir, tasks=["mmlu"], num_fewshot=5))  # fine: lm-eval's mmlu has a dev split
    with pytest.raises(UserError, match="is not a directory"):
        tasks.include_dirs(_cfg(tmp_path / "missing"))


def test_read_results_errors(tmp_path):
    with pytest.raises(UserError, match="no eval results"):
        results_io.read_results(tmp_path / "results.json")
    (tmp_path / "bad.json").write_text("{\n  oops")
    with pytest.raises(UserError, match="bad.json:2: not valid JSON"):
        results_io.read_results(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"x": 1}')
    with pytest.raises(UserError, match="no 'results' mapping"):
        results_io.read_results(tmp_path / "other.json")
