"""Pieces every bench part shares: medians, LoRA rank matching, targeted-matrix shapes, timing helpers."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from sift_llm.sift.config import LLAMA_PROJECTIONS, matches


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def target_shapes(model: nn.Module, targets: list[str] | None = None) -> list[tuple[int, int]]:
    """(out, in) of every nn.Linear that SIFT and LoRA target, in module order."""
    targets = targets or LLAMA_PROJECTIONS
    return [
        (module.out_features, module.in_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, targets)
    ]


def sift_count(shapes: list[tuple[int, int]], density: float) -> int:
    """Selected entries at ``density`` with per-matrix scope (as attach_sift counts them)."""
    return sum(min(o * i, max(1, round(density * o * i))) for o, i in shapes)


def lora_count(shapes: list[tuple[int, int]], r: int) -> int:
    """LoRA trainable parameters at rank ``r``: A (r x in) plus B (out x r) per matrix."""
    return sum(r * (o + i) for o, i in shapes)


def matching_lora_rank(shapes: list[tuple[int, int]], density: float) -> int:
    """The LoRA rank whose parameter count is nearest SIFT's selected count at ``density`` (at least 1)."""
    target = sift_count(shapes, density)
    per_rank = lora_count(shapes, 1)
    low = max(1, target // per_rank)
    return min((low, low + 1), key=lambda r: (abs(lora_count(shapes, r) - target), r))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, device work included."""
    synchronize(device)
    started = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - started


class MasterAdamW:
    """AdamW as mixed-precision trainers run it: parameters narrower than fp32 get an fp32 master copy.

    fp32 parameters (SIFT values, PEFT's LoRA matrices) are updated in place; bf16 ones (full fine-tuning
    of a bf16 model) are updated through their fp32 master and copied back, as DeepSpeed's bf16 optimizer
    does. State per bf16 parameter: 2 (weight) + 4 (master) + 8 (Adam) bytes; per fp32 parameter: 4 + 8.
    """

    def __init__(self, params: list[nn.Parameter], lr: float = 1e-4, weight_decay: float = 0.0):
        self.params = params
        self.masters = [p.detach().float() if p.dtype != torch.float32 else p for p in params]
        fused = bool(params) and params[0].device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=fused)

    def step(self) -> None:
        for param, master in zip(self.params, self.masters):
            if master is not param and param.grad is not None:
                master.grad = param.grad.float()
                param.grad = None
        self.optimizer.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.masters):
                if master is not param:
                    param.copy_(master)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param in self.params:
            param.grad = None

    def state_bytes(self) -> int:
        """Bytes of trainable state: parameters, masters, optimizer moments (gradients excluded)."""
        total = sum(p.numel() * p.element_size() for p in self.params)
        total += sum(m.numel() * m.element_size() for m, p in zip(self.masters, self.params) if m is not p)
        for state in self.optimizer.state.values():
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
        return total
