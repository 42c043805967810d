"""Dense gradients of the targeted matrices, one micro-batch at a time, folded into per-matrix statistics.

Plain autograd on the HF model: only the targeted weights require a gradient, and each one's gradient is
handed to its :class:`MatrixTracker` by a post-accumulate hook the moment backward has produced it, then
dropped. So at most one batch's gradients exist (in practice one matrix's), whatever the model size.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from sift_llm.analysis.config import AnalysisConfig
from sift_llm.analysis.stats import MatrixTracker, density_grid
from sift_llm.errors import UserError
from sift_llm.runtime import progress

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_index(name: str) -> int | None:
    """The first integer component of a module name (``model.layers.7.mlp.up_proj`` -> 7), or None."""
    found = _LAYER.search(name)
    return int(found.group(1)) if found else None


def module_type(name: str) -> str:
    """The last component of a module name (``q_proj``)."""
    return name.rsplit(".", 1)[-1]


@contextlib.contextmanager
def _single_threaded(device: torch.device):
    """On the CPU, run the statistics on one thread: they are memory-bound passes and a sort, and on a busy
    machine intra-op threads waiting on each other made them 4-7x slower (measured on 2 shared cores)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class ModelStatistics:
    """Every targeted matrix's tracker for one model (pretrained or random init), plus the batch losses."""

    label: str
    trackers: list[MatrixTracker]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0  # forward, backward and statistics
    statistics_seconds: float = 0.0  # of which the per-matrix statistics (inside backward's hooks)


def analysis_grid(acfg: AnalysisConfig) -> list[float]:
    return density_grid(extra=[*acfg.shares, acfg.coverage_share])


def gradient_statistics(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    batches: list[dict[str, torch.Tensor]],
    acfg: AnalysisConfig,
    *,
    label: str,
    device: torch.device | None = None,
) -> ModelStatistics:
    """Run forward/backward on each batch and fold every targeted matrix's gradient into its tracker.

    ``targets`` maps module names to the nn.Linear modules of ``model`` whose weights are analysed; every
    other parameter is frozen for the duration (and restored afterwards).
    """
    if not targets:
        raise UserError("no nn.Linear module matches method.sift.targets; nothing to analyse")
    device = device or next(model.parameters()).device
    grid = analysis_grid(acfg)
    trackers = {
        name: MatrixTracker(
            name=name,
            shape=tuple(module.weight.shape),
            shares=list(acfg.shares),
            coverage_share=acfg.coverage_share,
            cover_max=acfg.cover_max,
            keep=acfg.keep,
            grid=grid,
        )
        for name, module in targets.items()
    }
    previous = {p: p.requires_grad for p in model.parameters()}
    handles = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(param: torch.Tensor) -> None:
            began = time.perf_counter()
            with _single_threaded(param.grad.device):
                trackers[name].observe(param.grad)
            seen.add(name)
            param.grad = None
            stats.statistics_seconds += time.perf_counter() - began

        return hook

    stats = ModelStatistics(label=label, trackers=list(trackers.values()))
    started = time.perf_counter()
    was_training = model.training
    try:
        for param in model.parameters():
            param.requires_grad_(False)
        for name, module in targets.items():
            module.weight.requires_grad_(True)
            module.weight.grad = None
            handles.append(module.weight.register_post_accumulate_grad_hook(hook_for(name)))
        model.train()  # as in training (no dropout in LLaMA; gradient checkpointing acts only in train mode)
        for batch in progress(batches, desc=f"gradients ({label})", unit="batch"):
            seen.clear()
            batch = {key: value.to(device) for key, value in batch.items()}
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise UserError(f"{label}: loss is {float(loss)} on batch {len(stats.losses) + 1}")
            loss.backward()
            stats.losses.append(float(loss.detach()))
            missing = [name for name in trackers if name not in seen]
            if missing:
                raise UserError(f"{label}: no gradient reached {missing[0]} (and {len(missing) - 1} more)")
    finally:
        for handle in handles:
            handle.remove()
        for param, flag in previous.items():
            param.requires_grad_(flag)
            param.grad = None
        model.train(was_training)
    stats.seconds = time.perf_counter() - started
    return stats
