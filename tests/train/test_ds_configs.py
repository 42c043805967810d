"""Every shipped DeepSpeed config trains and exports: a short 2-rank SIFT run through launch.sh for each file
in ds_configs/, in fp32 and in bf16, ending in an adapter that loads and a merged model that plain
transformers loads, both giving the same logits. Under ZeRO-3 each rank holds half the weights from the
first byte, and trains what ZeRO-2 trains."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from train_support import REPO, config_writer, launched

pytestmark = pytest.mark.slow
CONFIGS = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """run(ds_config, precision) -> the run directory of a 2-step, 2-rank launch (each launched once)."""
    make_config = config_writer(tmp_path_factory.mktemp("ds-configs"), tiny_model_dir)
    done = {}

    def run(ds_config: str, precision: str):
        name = f"{ds_config.removesuffix('.json')}-{precision}"
        if name not in done:
            overrides = {}
            if "zero3" in ds_config:
                # Partition even the tiny model's small weights, as a real model's are.
                overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}
            config = make_config(name, train={"max_steps": 2, "precision": precision, "save_merged": True},
                                 deepspeed={"config": f"ds_configs/{ds_config}", "overrides": overrides})
            launched(config)
            done[name] = config.parent / name
        return done[name]

    return run


def test_every_config_file_is_covered():
    assert CONFIGS == ["zero0.json", "zero1.json", "zero2.json", "zero3.json", "zero3_offload.json"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _check_outputs(run_dir, tiny_model_dir, atol):
    from sift_llm.sift import load_adapter

    adapter = load_file(str(run_dir / "adapter" / "sift_adapter.safetensors"))
    values = [t for k, t in adapter.items() if k.endswith(".values")]
    assert all(torch.isfinite(v).all() for v in values)
    assert any(v.abs().sum() > 0 for v in values)
    in_memory = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    load_adapter(in_memory, run_dir / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()  # plain transformers
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    torch.testing.assert_close(_logits(merged, ids), _logits(in_memory, ids), rtol=0, atol=atol)
    assert not torch.allclose(_logits(merged, ids), _logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("ds_config", CONFIGS)
def test_config_trains_and_exports(runs, tiny_model_dir, ds_config, precision):
    run_dir = runs(ds_config, precision)
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["bf16"] == (precision == "bf16") and summary["steps"] == 2
    _check_outputs(run_dir, tiny_model_dir, atol=1e-5)


@pytest.mark.parametrize("ds_config", ["zero3.json", "zero3_offload.json"])
def test_zero3_ranks_hold_half_the_weights_and_train_what_zero2_trains(runs, ds_config):
    zero3, zero2 = runs(ds_config, "fp32"), runs("zero2.json", "fp32")
    summary = json.loads((zero3 / "train_summary.json").read_text())
    total = summary["total_parameter_elements"]
    for resident in (summary["resident_parameter_elements"],
                     json.loads((zero3 / "selection.json").read_text())["resident_parameter_elements"]):
        assert len(resident) == 2
        assert all(0.45 * total <= r <= 0.55 * total for r in resident), (resident, total)
    dense = json.loads((zero2 / "train_summary.json").read_text())["resident_parameter_elements"]
    assert dense == [total, total]
    expected, actual = (load_file(str(d / "adapter" / "sift_adapter.safetensors")) for d in (zero2, zero3))
    for key in expected:
        if key.endswith(".indices"):
            assert torch.equal(expected[key], actual[key]), key  # the same selection
        else:
            assert (expected[key] - actual[key]).abs().max() <= 1e-5, key


def test_global_scope_with_a_matrix_left_empty_exports_under_zero0(tmp_path, tiny_model_dir):
    make_config = config_writer(tmp_path, tiny_model_dir)
    config = make_config("empty-matrix", method={"name": "sift", "sift": {"scope": "global", "budget": 40}},
                         train={"max_steps": 2, "save_merged": True}, deepspeed={"config": "ds_configs/zero0.json"})
    launched(config)
    run_dir = config.parent / "empty-matrix"
    selection = json.loads((run_dir / "selection.json").read_text())
    assert selection["selected"] == 40
    assert any(m["selected"] == 0 for m in selection["matrices"])
    _check_outputs(run_dir, tiny_model_dir, atol=1e-5)


def test_global_scope_under_zero3_is_refused_with_what_to_do(tmp_path, tiny_model_dir):
    from train_support import launch

    make_config = config_writer(tmp_path, tiny_model_dir)
    config = make_config("global-z3", method={"name": "sift", "sift": {"scope": "global"}},
                         deepspeed={"config": "ds_configs/zero3.json"})
    result = launch(config)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "scope=global needs every matrix's count before ZeRO-3" in output and "Traceback" not in output
