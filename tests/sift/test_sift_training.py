"""Training: density 1 equals full fine-tuning; sparse training touches only selected entries, from step 1."""

from __future__ import annotations

import torch
from sift_test_utils import lm_loss, selected_model, tiny_model, token_batches, train

from sift_llm.sift import SiftConfig
from sift_llm.sift.layer import merged_weight


def effective_weights(handle) -> dict[str, torch.Tensor]:
    return {name: merged_weight(layer.weight, layer.values, layer.indices) for name, layer in handle.layers.items()}


def test_density_one_trains_like_full_fine_tuning_of_the_targets():
    steps = token_batches(5, seed=7)
    full = tiny_model()
    full.requires_grad_(False)
    targets = {n: m for n, m in full.named_modules() if n.endswith("_proj")}
    optimizer = torch.optim.AdamW([m.weight.requires_grad_(True) for m in targets.values()], lr=1e-2, weight_decay=0.0)
    full_losses = []
    for ids in steps:
        loss = lm_loss(full, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        full_losses.append(loss.item())

    _, handle, _ = selected_model(SiftConfig(density=1.0))
    assert all(layer.k == layer.numel_weight for layer in handle.layers.values())
    sift_losses = train(handle, steps)

    torch.testing.assert_close(sift_losses, full_losses, rtol=1e-5, atol=1e-6)
    for name, weight in effective_weights(handle).items():
        torch.testing.assert_close(weight, targets[name].weight.detach(), rtol=1e-5, atol=1e-6)


def test_sparse_training_changes_every_selected_matrix_at_step_one_and_nothing_else():
    model, handle, _ = selected_model(SiftConfig(density=0.05, dense_modules=["lm_head"]))
    base = tiny_model().state_dict()
    steps = token_batches(3, seed=11)

    # Step 1: every layer gets its gradient from the very first backward, and the step moves it at once.
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3, weight_decay=0.0)
    lm_loss(model, steps[0]).backward()
    assert all(layer.values.grad is not None and layer.values.grad.ne(0).all() for layer in handle.layers.values())
    optimizer.step()
    optimizer.zero_grad()
    for name, weight in effective_weights(handle).items():
        indices = handle.layers[name].indices.long()
        moved = weight.view(-1)[indices] != base[f"{name}.weight"].view(-1)[indices]
        assert moved.all(), f"{name}: {int((~moved).sum())} selected entries did not move at step 1"
    assert not torch.equal(model.lm_head.weight, base["lm_head.weight"])

    for ids in steps[1:]:
        lm_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, weight in effective_weights(handle).items():
        untouched = torch.ones(weight.numel(), dtype=torch.bool)
        untouched[handle.layers[name].indices.long()] = False
        assert torch.equal(weight.view(-1)[untouched], base[f"{name}.weight"].view(-1)[untouched]), name
    trained = {f"{n}.weight" for n in handle.layers} | {"lm_head.weight"}
    for key, tensor in model.state_dict().items():
        if key in base and key not in trained:
            assert torch.equal(tensor, base[key]), key
