"""Trainable-state accounting: at most 16 bytes plus the index per selected entry, equal to a direct count."""

from __future__ import annotations

import torch
from sift_test_utils import selected_model, token_batches, train

from sift_llm.sift import SiftConfig


def test_fp32_values_with_adamw_match_a_direct_count():
    _, handle, _ = selected_model(SiftConfig(density=0.05, dense_modules=["lm_head"]))
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
    loss = handle.model(input_ids=token_batches(1)[0], labels=token_batches(1)[0]).loss
    loss.backward()
    optimizer.step()

    report = handle.memory_report()
    sparse = report.total("sparse")
    values = [layer.values for layer in handle.layers.values()]
    direct_values = sum(v.numel() * v.element_size() for v in values)
    direct_moments = sum(
        optimizer.state[v][key].numel() * optimizer.state[v][key].element_size()
        for v in values
        for key in ("exp_avg", "exp_avg_sq")
    )
    direct_indices = sum(layer.indices.numel() * layer.indices.element_size() for layer in handle.layers.values())
    assert sparse.entries == sum(v.numel() for v in values)
    assert sparse.values_bytes == direct_values
    assert sparse.master_bytes == 0
    assert sparse.optimizer_bytes == direct_moments
    assert sparse.index_bytes == direct_indices
    assert sparse.state_bytes == direct_values + direct_moments + direct_indices
    assert sparse.bytes_per_entry == 16.0  # 4 value + 8 Adam + 4 index
    dense = report.total("dense")
    assert dense.entries == handle.model.lm_head.weight.numel()
    assert dense.bytes_per_entry == 12.0
    assert report.to_dict()["sparse"]["bytes_per_entry"] == 16.0


def test_bf16_values_with_fp32_master_as_under_deepspeed():
    _, handle, _ = selected_model()
    handle.model.to(torch.bfloat16)  # what a DeepSpeed bf16 engine does to the module
    sparse = handle.memory_report().total("sparse")
    per_entry = {
        key: getattr(sparse, key) / sparse.entries
        for key in ("values_bytes", "master_bytes", "optimizer_bytes", "index_bytes", "gradient_bytes")
    }
    assert per_entry == {
        "values_bytes": 2,
        "master_bytes": 4,
        "optimizer_bytes": 8,
        "index_bytes": 4,
        "gradient_bytes": 2,
    }
    assert sparse.bytes_per_entry == 18.0 <= 16 + 4
    assert "B/entry" in handle.memory_report().summary()


def test_plain_sgd_and_no_master():
    _, handle, _ = selected_model()
    train(handle, token_batches(1))
    assert handle.memory_report(optimizer="sgd", master_dtype=None).total("sparse").bytes_per_entry == 8.0
