"""The sparse-increment Linear: exact gradients, 3-D inputs, checkpointing, bf16, state-dict behaviour."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sift_test_utils import lm_loss, selected_model, token_batches
from torch import nn

from sift_llm.sift import SiftConfig, SiftLinear, attach_sift
from sift_llm.sift import layer as layer_module
from sift_llm.sift.layer import _SparseIncrementLinear, index_dtype, merged_weight


def sparse_linear(in_features: int, out_features: int, k: int, dtype=torch.float64, seed: int = 0) -> SiftLinear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, dtype=dtype)
    layer = SiftLinear.convert(linear, "probe", k, dtype)
    layer.set_selection(torch.randperm(in_features * out_features)[:k].sort().values)
    with torch.no_grad():
        layer.values.normal_()
    return layer


@pytest.mark.parametrize("block_elements", [1 << 24, 12])
def test_gradcheck_values_and_input(monkeypatch, block_elements):
    # 12-entry blocks split the 5x6 weight into 3 row blocks, exercising the chunked gradient.
    monkeypatch.setattr(layer_module, "GRAD_BLOCK_ELEMENTS", block_elements)
    layer = sparse_linear(6, 5, k=9)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)

    def forward(x, values):
        return _SparseIncrementLinear.apply(x, layer.weight, layer.bias, values, layer.indices, None, layer)

    assert torch.autograd.gradcheck(forward, (x, layer.values))


@pytest.mark.parametrize("block_elements", [1 << 24, 100])
def test_values_grad_is_dense_weight_grad_at_indices(monkeypatch, block_elements):
    monkeypatch.setattr(layer_module, "GRAD_BLOCK_ELEMENTS", block_elements)
    model, handle, _ = selected_model(SiftConfig(density=0.2))
    layer = handle.layers["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.values.normal_(std=0.1)
    x = torch.randn(3, 7, layer.in_features, requires_grad=True)
    upstream = torch.randn(3, 7, layer.out_features)

    dense = nn.Linear(layer.in_features, layer.out_features, bias=False)
    with torch.no_grad():
        dense.weight.copy_(merged_weight(layer.weight, layer.values, layer.indices))
    x_ref = x.detach().clone().requires_grad_(True)
    (dense(x_ref) * upstream).sum().backward()
    (layer(x) * upstream).sum().backward()

    torch.testing.assert_close(layer.values.grad, dense.weight.grad.view(-1)[layer.indices.long()], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert layer.weight.grad is None


def values_grads(model, handle, ids) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    lm_loss(model, ids).backward()
    return {name: layer.values.grad.clone() for name, layer in handle.layers.items()}


# gradient_checkpointing_enable is deprecated in newer transformers 5.x but is the name every 5.x has.
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_grads(reentrant):
    model, handle, _ = selected_model()
    ids = token_batches(2)[1]
    model.train()
    plain = values_grads(model, handle, ids)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    checkpointed = values_grads(model, handle, ids)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_bf16_base_trains_with_fp32_values():
    model, handle, _ = selected_model()
    model.to(torch.bfloat16)
    for layer in handle.layers.values():
        layer.values.data = layer.values.data.float()  # keep fp32 values on a bf16 base
    grads = values_grads(model, handle, token_batches(2)[1])
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(layer.weight.dtype == torch.bfloat16 for layer in handle.layers.values())


def test_bf16_base_calibrates_and_runs_under_autocast():
    model = selected_model()[0]
    bf16_model = type(model)(model.config).to(torch.bfloat16)
    handle = attach_sift(bf16_model, SiftConfig(density=0.05))
    selector = handle.selector()
    with selector.calibrating():
        lm_loss(bf16_model, token_batches(1)[0]).backward()
    selector.finalize()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = lm_loss(bf16_model, token_batches(2)[1])
    loss.backward()
    assert all(torch.isfinite(layer.values.grad).all() for layer in handle.layers.values())


def test_forward_refuses_to_train_before_selection():
    model = selected_model()[0]
    fresh = type(model)(model.config)
    attach_sift(fresh, SiftConfig(density=0.05))
    with pytest.raises(RuntimeError, match="no sparse selection"):
        lm_loss(fresh, token_batches(1)[0])


def test_base_keys_stay_and_checkpoint_restores_the_selection():
    model, handle, _ = selected_model()
    base_keys = set(type(model)(model.config).state_dict())
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.values.normal_(std=0.01)
    state = model.state_dict()
    assert base_keys <= set(state)
    assert set(state) - base_keys == {f"{n}.{s}" for n in handle.layers for s in ("values", "indices")}

    resumed = type(model)(model.config)
    attach_sift(resumed, SiftConfig(density=0.05))
    resumed.load_state_dict(state)  # a resume: indices and values come from the checkpoint
    ids = token_batches(1)[0]
    torch.testing.assert_close(resumed(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_index_dtype_and_frozen_base():
    assert index_dtype(2**31 - 1) == torch.int32
    assert index_dtype(2**31) == torch.int64
    _, handle, _ = selected_model()
    for layer in handle.layers.values():
        assert not layer.weight.requires_grad
        assert layer.indices.dtype == torch.int32
        assert torch.all(layer.indices[1:] > layer.indices[:-1])


@pytest.mark.parametrize("autocast", [False, True])
def test_increment_merge_trains_a_model_like_the_weight_patch(autocast):
    # merge "increment" (W untouched, a separate sparse product) against the default in-place patch
    model, handle, _ = selected_model()
    with torch.no_grad():
        for layer in handle.layers.values():
            layer.values.normal_(std=0.01)
    ids = token_batches(2)[1]
    grads = {}
    for merge in ("patch", "increment"):
        for layer in handle.layers.values():
            layer.merge = merge
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            grads[merge] = values_grads(model, handle, ids)
    for name, patched in grads["patch"].items():
        separate = grads["increment"][name]
        assert separate.dtype == torch.float32 and torch.isfinite(separate).all()
        if autocast:  # bf16 products: W + v rounded once vs W and v rounded apart
            assert F.cosine_similarity(separate, patched, dim=0) > 0.99, name
        else:
            torch.testing.assert_close(separate, patched, rtol=1e-4, atol=1e-6)
