"""The fast layer paths are exact: sampled (SDDMM) and dense values' gradients, the in-place weight patch,
the separate sparse product (merge "increment"), and the layer options that choose them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sift_llm.errors import UserError

from sift_llm.sift import SiftConfig, SiftLinear, attach_sift, kernels
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


def use_paths(layer: SiftLinear, merge: str, values_grad: str) -> SiftLinear:
    layer.merge, layer.values_grad = merge, values_grad
    return layer


@pytest.mark.parametrize(("merge", "values_grad"), PATHS)
def test_gradcheck_every_path(merge, values_grad):
    layer = use_paths(sparse_linear(7, 5, k=6), merge, values_grad)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)

    def forward(x, values):
        return _SparseIncrementLinear.apply(x, layer.weight, layer.bias, values, layer.indices, None, layer)

    assert torch.autograd.gradcheck(forward, (x, layer.values))


@pytest.mark.parametrize(("merge", "values_grad"), PATHS)
@pytest.mark.parametrize("density", [0.004, 0.05, 0.5])
def test_every_path_matches_dense_autograd_at_the_indices(merge, values_grad, density):
    in_features, out_features = 96, 80
    layer = sparse_linear(in_features, out_features, k=max(1, round(density * in_features * out_features)),
                          dtype=torch.float32, seed=3)
    use_paths(layer, merge, values_grad)
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
    monkeypatch.setattr(layer_module, "SAMPLED_MAX_DENSITY", {"cpu": 0.08})
    monkeypatch.setattr(kernels, "triton_usable", lambda device: False)
    assert values_grad_path(10_000, 100, cpu) == "sampled"
    assert values_grad_path(10_000, 900, cpu) == "dense"
    assert values_grad_path(10_000, 1, cuda) == "dense"  # no measured crossover: the dense path
    assert values_grad_path(10_000, 9_000, cpu, "sampled") == "sampled"
    with pytest.raises(ValueError, match="values_grad"):
        values_grad_path(10_000, 1, cpu, "fast")


def test_cost_rule_takes_triton_on_cuda_below_its_density_when_usable(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(layer_module, "SAMPLED_MAX_DENSITY", {"cpu": 0.08})
    monkeypatch.setattr(layer_module, "TRITON_MAX_DENSITY", {"cuda": 0.015})
    monkeypatch.setattr(kernels, "triton_usable", lambda device: True)
    assert values_grad_path(10_000, 100, cuda, dtype=torch.bfloat16) == "triton"
    assert values_grad_path(10_000, 500, cuda, dtype=torch.bfloat16) == "dense"  # 5%: the dense GEMM
    assert values_grad_path(10_000, 100, cuda, dtype=torch.float64) == "dense"  # no fp64 Triton kernel
    assert values_grad_path(10_000, 100, cpu) == "sampled"  # auto never runs the interpreter
    assert values_grad_path(10_000, 500, cuda, "triton") == "triton"
    # the pattern's load ratio (the kernel's traffic) decides inside the density threshold
    monkeypatch.setattr(layer_module, "TRITON_MAX_LOAD_RATIO", {"cuda": 0.01})
    assert values_grad_path(10_000, 100, cuda, dtype=torch.bfloat16, load_ratio=lambda: 0.005) == "triton"
    assert values_grad_path(10_000, 100, cuda, dtype=torch.bfloat16, load_ratio=lambda: 0.02) == "dense"

    def never():
        raise AssertionError("the load ratio is only computed past the density threshold")

    assert values_grad_path(10_000, 500, cuda, dtype=torch.bfloat16, load_ratio=never) == "dense"


def test_layer_load_ratio_is_cached_and_keeps_the_plan_only_when_it_is_used(monkeypatch):
    layer = sparse_linear(64, 48, k=40, dtype=torch.float32)
    monkeypatch.setattr(layer_module, "TRITON_MAX_LOAD_RATIO", {"cpu": 0.0})
    ratio = layer.load_ratio()
    plan = kernels.build_tile_plan(layer.indices, 48, 64, layer_module.TRITON_GROUP_ROWS, layer_module.TRITON_TILE_COLS)
    assert ratio == plan.load_ratio() > 0 and "plan" not in layer._kernel_cache
    monkeypatch.setattr(layer_module, "TRITON_MAX_LOAD_RATIO", {"cpu": 1.0})
    layer.set_selection(layer.indices.flip(0).sort().values)  # a new selection drops the cache
    assert layer.load_ratio() == ratio and "plan" in layer._kernel_cache


def test_config_options_reach_every_layer_and_unknown_paths_are_refused():
    from sift_test_utils import tiny_model

    handle = attach_sift(tiny_model(), SiftConfig(density=0.1, values_grad="sampled", merge="increment"))
    assert {(layer.values_grad, layer.merge) for layer in handle.layers.values()} == {("sampled", "increment")}
    assert "values_grad=sampled, merge=increment" in repr(next(iter(handle.layers.values())))
    with pytest.raises(ValueError, match="values_grad"):
        SiftLinear.convert(nn.Linear(4, 3), "probe", 2, torch.float32, values_grad="fast")
    with pytest.raises(ValueError, match="merge"):
        SiftLinear.convert(nn.Linear(4, 3), "probe", 2, torch.float32, merge="copy")


def test_explicit_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "triton_usable", lambda device: False)
    layer = use_paths(sparse_linear(8, 6, k=10, dtype=torch.float32), "patch", "triton")
    x = torch.randn(3, 8)
    out = layer(x)  # the forward needs no Triton kernel
    with pytest.raises(UserError, match="values_grad 'triton' needs CUDA tensors and the triton package"):
        out.sum().backward()


@pytest.mark.parametrize("values_grad", ["sampled", "dense"])
def test_gradcheck_increment_path(values_grad):
    layer = use_paths(sparse_linear(7, 5, k=6), "increment", values_grad)
    x = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)

    def forward(x, values):
        return _SparseIncrementLinear.apply(x, layer.weight, layer.bias, values, layer.indices, None, layer)

    assert torch.autograd.gradcheck(forward, (x, layer.values))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.004, 0.05, 0.5])
def test_increment_path_matches_the_patched_weight_and_never_touches_it(monkeypatch, dtype, density):
    in_features, out_features = 96, 80
    k = max(1, round(density * in_features * out_features))
    layer = sparse_linear(in_features, out_features, k=k, dtype=dtype, seed=4)
    with torch.no_grad():
        layer.values.mul_(0.05)
    reference = sparse_linear(in_features, out_features, k=k, dtype=dtype, seed=4)
    with torch.no_grad():
        reference.values.copy_(layer.values)
    use_paths(layer, "increment", "dense")
    base = layer.weight.detach().clone()
    x = torch.randn(4, 9, in_features, dtype=dtype, requires_grad=True)
    upstream = torch.randn(4, 9, out_features, dtype=dtype)
    x_ref = x.detach().clone().requires_grad_(True)

    def no_patch(*args):
        raise AssertionError("the increment path must never form W + increment")

    monkeypatch.setattr(layer_module, "effective_weight", no_patch)
    monkeypatch.setattr(layer_module, "merged_weight", no_patch)
    out = layer(x)
    (out * upstream).sum().backward()
    monkeypatch.undo()
    out_ref = reference(x_ref)
    (out_ref * upstream).sum().backward()

    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 6e-2}
    torch.testing.assert_close(out, out_ref, **tolerance)
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerance)
    torch.testing.assert_close(layer.values.grad, reference.values.grad, **tolerance)
    assert torch.equal(layer.weight, base)


def test_increment_reference_products_match_dense_matrices():
    torch.manual_seed(1)
    out_features, in_features, tokens = 23, 19, 6
    indices = torch.randperm(out_features * in_features)[:60].sort().values.to(torch.int32)
    values = torch.randn(60, dtype=torch.float64)
    dense = torch.zeros(out_features * in_features, dtype=torch.float64)
    dense[indices.long()] = values
    dense = dense.view(out_features, in_features)
    patterns = kernels.increment_patterns(indices, out_features, in_features)
    x = torch.randn(tokens, in_features, dtype=torch.float64)
    grad = torch.randn(tokens, out_features, dtype=torch.float64)
    torch.testing.assert_close(kernels.increment_matmul(x, patterns, values), x @ dense.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.increment_matmul_transposed(grad, patterns, values), grad @ dense,
                               rtol=1e-12, atol=1e-12)
    bf16 = kernels.increment_matmul(x.to(torch.bfloat16), patterns, values)
    assert bf16.dtype == torch.bfloat16  # computed in fp32 (CPU CSR kernels have no bf16), returned as the input
