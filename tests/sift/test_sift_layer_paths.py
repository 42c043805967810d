"""The fast layer paths are exact: sampled (SDDMM) and dense values' gradients, the in-place weight patch."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sift_llm.sift import SiftLinear
from sift_llm.sift import layer as layer_module
from sift_llm.sift.layer import (
    _SparseIncrementLinear,
    effective_weight,
    merged_weight,
    sddmm_values_grad,
    values_grad_path,
)

PATHS = [("patch", "sampled"), ("patch", "dense"), ("clone", "sampled"), ("clone", "dense")]


def sparse_linear(in_features: int, out_features: int, k: int, dtype=torch.float64, seed: int = 0) -> SiftLinear:
    torch.manual_seed(seed)
    layer = SiftLinear.convert(nn.Linear(in_features, out_features, dtype=dtype), "probe", k, dtype)
    layer.set_selection(torch.randperm(in_features * out_features)[:k].sort().values)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def use_paths(monkeypatch, merge: str, values_grad: str) -> None:
    monkeypatch.setattr(layer_module, "MERGE", merge)
    monkeypatch.setattr(layer_module, "VALUES_GRAD", values_grad)


@pytest.mark.parametrize(("merge", "values_grad"), PATHS)
def test_gradcheck_every_path(monkeypatch, merge, values_grad):
    use_paths(monkeypatch, merge, values_grad)
    layer = sparse_linear(7, 5, k=6)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)

    def forward(x, values):
        return _SparseIncrementLinear.apply(x, layer.weight, layer.bias, values, layer.indices, None, layer)

    assert torch.autograd.gradcheck(forward, (x, layer.values))


@pytest.mark.parametrize(("merge", "values_grad"), PATHS)
@pytest.mark.parametrize("density", [0.004, 0.05, 0.5])
def test_every_path_matches_dense_autograd_at_the_indices(monkeypatch, merge, values_grad, density):
    use_paths(monkeypatch, merge, values_grad)
    in_features, out_features = 96, 80
    layer = sparse_linear(in_features, out_features, k=max(1, round(density * in_features * out_features)),
                          dtype=torch.float32, seed=3)
    base = layer.weight.detach().clone()
    x = torch.randn(4, 9, in_features, requires_grad=True)
    upstream = torch.randn(4, 9, out_features)

    reference = nn.Linear(in_features, out_features, dtype=torch.float32)
    with torch.no_grad():
        reference.weight.copy_(merged_weight(layer.weight, layer.values, layer.indices))
        reference.bias.copy_(layer.bias)
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = reference(x_ref)
    (out_ref * upstream).sum().backward()
    out = layer(x)
    (out * upstream).sum().backward()

    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)  # same effective weight bits, same product
    torch.testing.assert_close(layer.values.grad, reference.weight.grad.view(-1)[layer.indices.long()],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    assert torch.equal(layer.weight, base), "the frozen weight must be restored bit for bit"
    assert layer.weight.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_patch_equals_clone_bitwise_and_restores(dtype):
    layer = sparse_linear(33, 17, k=50, dtype=dtype, seed=5)
    with torch.no_grad():
        layer.values.mul_(1e-2)
    before = layer.weight.detach().clone()
    expected = merged_weight(layer.weight, layer.values, layer.indices)
    version = layer.weight._version
    with effective_weight(layer.weight, layer.values, layer.indices) as patched:
        assert torch.equal(patched, expected)
    assert torch.equal(layer.weight, before)
    assert layer.weight._version == version  # autograd's saved-tensor check never sees the patch


def test_patch_restores_the_weight_when_the_product_fails():
    layer = sparse_linear(6, 4, k=5)
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError), effective_weight(layer.weight, layer.values, layer.indices):
        raise RuntimeError("boom")
    assert torch.equal(layer.weight, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_matches_the_dense_product(dtype):
    torch.manual_seed(0)
    tokens, out_features, in_features = 13, 40, 24
    grad = torch.randn(tokens, out_features, dtype=dtype)
    inputs = torch.randn(tokens, in_features, dtype=dtype)
    indices = torch.randperm(out_features * in_features)[:77].sort().values.to(torch.int32)
    expected = (grad.double().t() @ inputs.double()).view(-1)[indices.long()]
    result = sddmm_values_grad(grad, inputs, indices, in_features)
    assert result.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result.double(), expected, rtol=tolerance, atol=tolerance)


def test_cost_rule_and_override(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(layer_module, "VALUES_GRAD", "auto")
    monkeypatch.setattr(layer_module, "SAMPLED_MAX_DENSITY", {"cpu": 0.08})
    assert values_grad_path(10_000, 100, cpu) == "sampled"
    assert values_grad_path(10_000, 900, cpu) == "dense"
    assert values_grad_path(10_000, 1, cuda) == "dense"  # no measured crossover: the dense path
    monkeypatch.setattr(layer_module, "VALUES_GRAD", "sampled")
    assert values_grad_path(10_000, 9_000, cpu) == "sampled"
    monkeypatch.setattr(layer_module, "VALUES_GRAD", "fast")
    with pytest.raises(ValueError, match="SIFT_LLM_VALUES_GRAD"):
        values_grad_path(10_000, 1, cpu)
