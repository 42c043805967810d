"""The whole SIFT cycle on this process's accelerator (skipped on CPU-only machines)."""

from __future__ import annotations

import pytest
import torch
from sift_test_utils import lm_loss, tiny_model, token_batches
from torch import nn

from sift_llm.runtime import default_device
from sift_llm.sift import SiftConfig, attach_sift, load_adapter, merge_into_base, save_adapter
from sift_llm.sift.layer import merged_weight

DEVICE = default_device()
pytestmark = pytest.mark.skipif(DEVICE.type == "cpu", reason="needs a GPU or other accelerator")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["grad_abs", "random"])
def test_select_train_save_load_merge_on_the_accelerator(tmp_path, dtype, metric):
    model = tiny_model().to(DEVICE, dtype)
    handle = attach_sift(model, SiftConfig(density=0.05, metric=metric))
    ids = [batch.to(DEVICE) for batch in token_batches(4)]
    selector = handle.selector()
    with selector.calibrating():
        lm_loss(model, ids[0]).backward()
    selector.finalize()
    assert all(layer.indices.device.type == DEVICE.type for layer in handle.layers.values())

    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for batch in ids[1:]:
        lm_loss(model, batch).backward()
        assert all(torch.isfinite(layer.values.grad).all() for layer in handle.layers.values())
        optimizer.step()
        optimizer.zero_grad()
    assert all(layer.values.ne(0).all() for layer in handle.layers.values())

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids[0]).logits
    fresh = tiny_model().to(DEVICE, dtype).eval()
    load_adapter(fresh, save_adapter(handle, tmp_path / "adapter"))
    merge_into_base(fresh)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids[0]).logits, expected, rtol=0, atol=1e-5)


def test_values_grad_matches_dense_grad_on_the_accelerator():
    model = tiny_model().to(DEVICE)
    handle = attach_sift(model, SiftConfig(density=0.3))
    selector = handle.selector()
    with selector.calibrating():
        lm_loss(model, token_batches(1)[0].to(DEVICE)).backward()
    selector.finalize()
    layer = handle.layers["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        layer.values.normal_(std=0.1)
    x = torch.randn(2, 5, layer.in_features, device=DEVICE)
    dense = nn.Linear(layer.in_features, layer.out_features, bias=False, device=DEVICE)
    with torch.no_grad():
        dense.weight.copy_(merged_weight(layer.weight, layer.values, layer.indices))
    dense(x).square().sum().backward()
    layer(x).square().sum().backward()
    torch.testing.assert_close(layer.values.grad, dense.weight.grad.view(-1)[layer.indices.long()])
