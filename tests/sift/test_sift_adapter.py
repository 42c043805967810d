"""Adapter files: reload onto a fresh base, merge into a plain HF checkpoint, refuse a foreign base, no pickle."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from sift_test_utils import selected_model, tiny_model, token_batches, train
from torch import nn
from transformers import AutoModelForCausalLM

from sift_llm.errors import UserError
from sift_llm.sift import SiftConfig, SiftLinear, load_adapter, merge_into_base, save_adapter
from sift_llm.sift.adapter import META_FILE, TENSORS_FILE

CONFIG = SiftConfig(density=0.05, dense_modules=["lm_head"])


@pytest.fixture(scope="module")
def trained():
    model, handle, report = selected_model(CONFIG)
    train(handle, token_batches(3, seed=5))
    model.eval()
    return model, handle, report


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batches(1, seed=99)[0]).logits


def test_save_then_load_on_a_fresh_base_reproduces_the_logits(trained, tmp_path, monkeypatch):
    model, handle, report = trained
    directory = save_adapter(handle, tmp_path / "adapter", extra={"selection": report.to_dict()})
    assert sorted(p.name for p in directory.iterdir()) == sorted([TENSORS_FILE, META_FILE])

    def refuse(*args, **kwargs):
        raise AssertionError("the adapter loader must not unpickle")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh = tiny_model().eval()
    loaded = load_adapter(fresh, directory)
    assert torch.equal(logits(fresh), logits(model))
    for name, layer in loaded.layers.items():
        assert torch.equal(layer.indices, handle.layers[name].indices)


def test_adapter_metadata_and_tensors(trained, tmp_path):
    _, handle, report = trained
    directory = save_adapter(handle, tmp_path / "adapter", extra={"selection": report.to_dict()})
    meta = json.loads((directory / META_FILE).read_text())
    assert meta["format_version"] == 1
    assert meta["base_model"]["fingerprint"] == handle.fingerprint
    assert meta["config"]["density"] == 0.05 and meta["config"]["metric"] == "grad_abs"
    assert meta["dense"] == ["lm_head.weight"]
    assert meta["selected"] == report.selected
    assert meta["modules"]["model.layers.0.self_attn.q_proj"] == {"shape": [32, 32], "selected": 51}
    with safe_open(str(directory / TENSORS_FILE), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.q_proj.indices").dtype == torch.int32
    assert keys == {f"{n}.{s}" for n in handle.layers for s in ("indices", "values")} | {"lm_head.weight"}


def test_explicit_increments_are_saved_as_given(trained, tmp_path):
    _, handle, _ = trained
    increments = {name: (indices, values * 0 + 1) for name, (indices, values) in handle.increments().items()}
    directory = save_adapter(handle, tmp_path / "adapter", increments=increments)
    fresh = tiny_model()
    loaded = load_adapter(fresh, directory)
    assert all(torch.all(layer.values == 1) for layer in loaded.layers.values())


def test_merge_gives_a_plain_checkpoint_that_transformers_loads(trained, tmp_path):
    model, handle, _ = trained
    expected = logits(model)
    directory = save_adapter(handle, tmp_path / "adapter")
    merged = tiny_model().eval()
    load_adapter(merged, directory)
    merge_into_base(merged)
    assert not any(isinstance(m, SiftLinear) for m in merged.modules())
    assert set(merged.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(logits(merged), expected, rtol=0, atol=1e-6)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-6)


def test_loading_onto_a_different_base_names_both(trained, tmp_path):
    _, handle, _ = trained
    directory = save_adapter(handle, tmp_path / "adapter")
    other = tiny_model(hidden=48)
    other.name_or_path = "other-base"
    with pytest.raises(UserError, match=r"trained on base .* but the model given is 'other-base'") as err:
        load_adapter(other, directory)
    assert handle.fingerprint[:16] in str(err.value)
    assert not any(isinstance(m, SiftLinear) for m in other.modules()), "a refused load must not modify the model"


def test_a_base_in_another_dtype_is_accepted(trained, tmp_path):
    model, handle, _ = trained
    directory = save_adapter(handle, tmp_path / "adapter")
    bf16 = tiny_model().to(torch.bfloat16).eval()
    load_adapter(bf16, directory)
    torch.testing.assert_close(logits(bf16).float(), logits(model), rtol=0.05, atol=0.05)


def test_writes_are_atomic_and_do_not_overwrite(trained, tmp_path):
    _, handle, _ = trained
    directory = save_adapter(handle, tmp_path / "adapter")
    with pytest.raises(FileExistsError):
        save_adapter(handle, directory)
    save_adapter(handle, directory, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]
    with pytest.raises(UserError, match="is not a SIFT adapter"):
        load_adapter(tiny_model(), tmp_path)


def test_loading_onto_its_own_merged_model_is_refused(trained, tmp_path):
    _, handle, _ = trained
    directory = save_adapter(handle, tmp_path / "adapter")
    merged = merge_into_base(load_adapter(tiny_model(), directory))  # W + delta at the selected positions
    merged.name_or_path = "merged-copy"
    with pytest.raises(UserError, match=r"trained on base .*'merged-copy'.*merged model that already contains"):
        load_adapter(merged, directory)  # would give W + 2 delta
    assert not any(isinstance(m, SiftLinear) for m in merged.modules())


def test_loading_onto_another_model_of_the_same_architecture_is_refused(trained, tmp_path):
    _, handle, _ = trained
    directory = save_adapter(handle, tmp_path / "adapter")
    other = tiny_model(seed=7)  # same names and shapes, other weights
    other.name_or_path = "another-fine-tune"
    with pytest.raises(UserError, match="'another-fine-tune'.*other weights at the adapter's positions.*sha256"):
        load_adapter(other, directory)
    # The recorded probes catch it across dtypes too.
    with pytest.raises(UserError, match=r"probed values differ"):
        load_adapter(tiny_model(seed=7).to(torch.bfloat16), directory)


def test_the_content_fingerprint_is_recorded_from_the_base_values(trained, tmp_path):
    _, handle, _ = trained
    meta = json.loads((save_adapter(handle, tmp_path / "adapter") / "sift_adapter.json").read_text())
    content = meta["base_model"]["content"]
    assert content["dtype"] == "torch.float32" and len(content["sha256"]) == 64
    name = "model.layers.0.self_attn.q_proj"
    layer = handle.layers[name]
    probes = torch.tensor(content["probes"][name])
    assert 0 < probes.numel() <= 16
    assert torch.equal(probes, layer.weight.detach().reshape(-1)[layer.indices.long()][
        torch.linspace(0, layer.k - 1, probes.numel()).round().long()])
