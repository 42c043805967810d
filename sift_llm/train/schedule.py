"""Learning-rate schedules: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(kind: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak learning rate at each optimizer step (0-based)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant" or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer, kind: str, warmup_ratio: float, total_steps: int):
    warmup = int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(kind, warmup, total_steps))
