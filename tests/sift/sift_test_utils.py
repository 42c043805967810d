"""Shared pieces of the SIFT tests: a tiny LLaMA, token batches, a one-call selection."""

from __future__ import annotations

import torch
from torch import nn

import tiny
from sift_llm.sift import SiftConfig, SiftHandle, attach_sift

VOCAB = 96


def tiny_model(seed: int = 0, **kwargs) -> nn.Module:
    return tiny.build_model(VOCAB, seed=seed, **kwargs)


def token_batches(count: int, batch: int = 2, seq: int = 12, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(torch.randint(0, VOCAB, (count, batch, seq), generator=generator))


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def select(handle: SiftHandle, batches: list[torch.Tensor]):
    selector = handle.selector()
    with selector.calibrating():
        for ids in batches:
            lm_loss(handle.model, ids).backward()
    return selector.finalize()


def selected_model(config: SiftConfig | None = None, *, seed: int = 0, batches: int = 1):
    """A tiny model with SIFT attached and selected on the first ``batches`` token batches."""
    config = config or SiftConfig(density=0.05)
    model = tiny_model(seed)
    handle = attach_sift(model, config)
    report = select(handle, token_batches(batches))
    return model, handle, report


def train(handle: SiftHandle, batches: list[torch.Tensor], lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for ids in batches:
        loss = lm_loss(handle.model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses
