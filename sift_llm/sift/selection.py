"""Choosing the trainable entries from gradient salience, one matrix at a time, in O(selected) memory.

While a :class:`Selector` is calibrating, every SIFT layer's backward hands its dense weight gradient G to
:meth:`Selector.observe` and returns no gradient for the values. The selector sums G over data-parallel
ranks, turns it into a score, folds the score into small per-matrix state and drops G, so at most one dense
matrix (plus its score) exists at a time and no full-model gradient copy is ever made.

Scores, with G the gradient of the whole data-parallel batch (summed over ranks before scoring, so every
rank scores the same numbers and the choice equals a single process's choice on the concatenated data):

- ``grad_abs``: |G| of the first batch (SIFT); ``grad_abs_sum``: |G| summed over batches;
- ``fisher``: G^2 summed; ``snip``: |W * G| summed; ``weight_abs``: |W|;
- ``random``: uniform numbers from a generator seeded by (seed, matrix position), identical on all ranks.

Accumulated metrics over N > 1 batches use a candidate pool: the first batch nominates the top
``pool_factor * k`` entries of each matrix (per_matrix) or of all matrices (global), and later batches add
their exact scores at those entries only. An entry outside the first batch's pool can never be chosen; this
is exact whenever the pool covers the matrix, and otherwise relies on the first batch's top set holding most
of the later batches' mass (SIFT, Figure 4). Ties always go to the lower flat position (for global scope:
earlier module, then lower position), and rank 0's final indices are broadcast so that floating-point
differences between ranks can never split the selection.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sift_llm import runtime
from sift_llm.errors import UserError
from sift_llm.sift.layer import SiftLinear

if TYPE_CHECKING:
    from sift_llm.sift.model import SiftHandle


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions (int64) of the ``k`` largest scores; among equal scores the lower position wins."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > threshold).squeeze(1)
    tied = torch.nonzero(scores == threshold).squeeze(1)
    return torch.cat([above, tied[: k - above.numel()]]).sort().values


@dataclass
class MatrixSelection:
    """What the selection kept in one matrix; shares are of the metric's mass and of sum(g^2)."""

    name: str
    shape: tuple[int, int]
    selected: int
    density: float
    score_share: float
    grad_sq_share: float


@dataclass
class SelectionReport:
    """The outcome of a selection: per-matrix counts and captured shares, totals, timing."""

    metric: str
    scope: str
    batches: int
    matrices: list[MatrixSelection]
    selected: int
    entries: int
    density: float
    score_share: float
    grad_sq_share: float
    calibration_seconds: float
    finalize_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"SIFT selection ({self.metric}, {self.scope}, {self.batches} batch(es)): {self.selected:,} of "
            f"{self.entries:,} entries ({self.density:.4%}) in {len(self.matrices)} matrices hold "
            f"{self.grad_sq_share:.2%} of sum(g^2); {self.calibration_seconds:.2f} s"
        )


@dataclass
class _MatrixState:
    """Per-matrix selection state; the tensors hold one entry per pooled candidate, never per matrix entry."""

    layer: SiftLinear
    ordinal: int
    offset: int  # position of the matrix's first entry in the concatenation of all targets (module order)
    batches: int = 0
    pool: torch.Tensor | None = None  # sorted flat positions (int64)
    score: torch.Tensor | None = None  # metric summed over batches, fp32
    grad_sq: torch.Tensor | None = None  # g^2 summed over batches, fp32
    totals: list[torch.Tensor] = field(default_factory=list)  # per batch: (whole-matrix score sum, sum g^2)


class Selector:
    """Scores gradients during calibration and fixes each SIFT layer's indices at :meth:`finalize`.

    The caller owns forward and backward (plain autograd, or the bare module under DeepSpeed)::

        selector = handle.selector()
        with selector.calibrating():
            for batch in batches:                 # config.calibration_batches of them
                model(**batch).loss.backward()
        report = selector.finalize()

    Each batch must run every targeted layer exactly once. Under data parallelism every rank runs the
    same number of batches on its own data; the collectives happen inside backward, in the same order on
    all ranks. Every parameter is frozen while calibrating, so no optimizer, DDP or DeepSpeed hook sees a
    calibration gradient (under DeepSpeed, ``engine.backward(loss)`` works as the backward).
    """

    def __init__(self, handle: SiftHandle, group: dist.ProcessGroup | None = None):
        self.handle = handle
        self.config = handle.config
        self.group = group
        self._states: dict[str, _MatrixState] = {}
        offset = 0
        for ordinal, (name, layer) in enumerate(handle.layers.items()):
            self._states[name] = _MatrixState(layer=layer, ordinal=ordinal, offset=offset)
            offset += layer.numel_weight
        factor = self.config.pool_factor if self.config.accumulates else 1.0
        self._global_pool_size = min(offset, math.ceil(factor * handle.global_budget))
        self._global: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # keys, score, grad_sq
        self.probe = torch.zeros((), requires_grad=True)
        self._started: float | None = None
        self._finalized = False

    @property
    def batches(self) -> int:
        """Calibration batches observed so far."""
        return max(state.batches for state in self._states.values())

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[Selector]:
        """Within this block, backward passes score gradients instead of producing values' gradients."""
        if self._finalized or self.handle.selected:
            raise UserError("the SIFT selection is already fixed; calibration runs once, before training")
        if self._started is None:
            self._started = time.perf_counter()
        # Every parameter is frozen meanwhile, so DeepSpeed's gradient hooks and the optimizer see nothing;
        # the probe alone makes autograd run the SIFT layers' backward.
        paused = [p for p in self.handle.model.parameters() if p.requires_grad]
        for param in paused:
            param.requires_grad_(False)
        for state in self._states.values():
            state.layer._observer = self
        try:
            yield self
        finally:
            for state in self._states.values():
                state.layer._observer = None
            for param in paused:
                param.requires_grad_(True)

    def observe(self, layer: SiftLinear, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """Fold one matrix's dense gradient (out, in) from one batch into the selection state (called in backward)."""
        state = self._states[layer.sift_name]
        if state.batches >= self.config.calibration_batches:
            raise UserError(
                f"{layer.sift_name}: more calibration batches than calibration_batches="
                f"{self.config.calibration_batches} (or the layer ran twice in one forward)"
            )
        grad = grad.to(torch.float32).reshape(-1)
        if self._distributed():
            dist.all_reduce(grad, group=self.group)
        if not bool(torch.isfinite(grad).all()):
            raise UserError(
                f"{layer.sift_name}: non-finite gradient in calibration batch {state.batches + 1}; "
                "with fp16 loss scaling calibrate in bf16/fp32 or lower the initial loss scale"
            )
        score = self._score(state, grad, weight)
        state.totals.append(torch.stack([score.sum(), torch.dot(grad, grad)]))
        if state.batches == 0:
            self._nominate(state, score, grad)
        else:
            self._split_global_pool()
            state.score += score[state.pool]
            state.grad_sq += grad[state.pool].square()
        state.batches += 1

    def finalize(self) -> SelectionReport:
        """Fix every layer's indices (sorted, values zero) from the calibration scores and report."""
        if self._finalized:
            raise UserError("Selector.finalize() was already called")
        start = time.perf_counter()
        self._check_batches()
        self._split_global_pool()
        states = list(self._states.values())
        chosen = self._choose(states)
        final = self._agree_across_ranks(
            [state.pool[positions] for state, positions in zip(states, chosen, strict=True)]
        )
        for state, indices in zip(states, final, strict=True):
            state.layer.set_selection(indices)
        self._finalized = True
        report = self._report(states, chosen, start)
        runtime.log(report.summary())
        return report

    # -- scoring -------------------------------------------------------------------------------------------

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1

    def _score(self, state: _MatrixState, grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        metric = self.config.metric
        if metric in ("grad_abs", "grad_abs_sum"):
            return grad.abs()
        if metric == "fisher":
            return grad.square()
        if metric == "snip":
            return (weight.detach().reshape(-1).to(torch.float32) * grad).abs_()
        if metric == "weight_abs":
            return weight.detach().reshape(-1).to(torch.float32).abs()
        if metric == "random":
            generator = torch.Generator(device=grad.device)
            generator.manual_seed(self.config.seed * 1_000_003 + state.ordinal)
            return torch.rand(grad.numel(), generator=generator, device=grad.device)
        raise AssertionError(f"unhandled metric {metric!r}")

    def _nominate(self, state: _MatrixState, score: torch.Tensor, grad: torch.Tensor) -> None:
        """First batch: keep the candidate pool (per matrix, or merged into the global pool)."""
        if self.config.scope == "per_matrix":
            factor = self.config.pool_factor if self.config.accumulates else 1.0
            size = min(score.numel(), math.ceil(factor * state.layer.k))
            state.pool = top_k_positions(score, size)
            state.score, state.grad_sq = score[state.pool], grad[state.pool].square()
            return
        positions = top_k_positions(score, self._global_pool_size)
        keys, scores, grad_sq = positions + state.offset, score[positions], grad[positions].square()
        if self._global is not None:
            keys, scores, grad_sq = (torch.cat(pair) for pair in zip(self._global, (keys, scores, grad_sq), strict=True))
            order = keys.argsort()  # keep the pool in module/position order so ties resolve by position
            keep = order[top_k_positions(scores[order], self._global_pool_size)]
            keys, scores, grad_sq = keys[keep], scores[keep], grad_sq[keep]
        self._global = (keys, scores, grad_sq)

    def _split_global_pool(self) -> None:
        """Hand each matrix its share of the first batch's global pool (once, after the first batch)."""
        if self._global is None:
            return
        keys, scores, grad_sq = self._global
        for state in self._states.values():
            lo, hi = torch.searchsorted(
                keys, torch.tensor([state.offset, state.offset + state.layer.numel_weight], device=keys.device)
            ).tolist()
            state.pool, state.score, state.grad_sq = keys[lo:hi] - state.offset, scores[lo:hi], grad_sq[lo:hi]
        self._global = None

    # -- finalizing ----------------------------------------------------------------------------------------

    def _check_batches(self) -> None:
        seen = self.batches
        if seen == 0:
            raise UserError("no calibration batch was run: run forward/backward inside selector.calibrating()")
        behind = [name for name, state in self._states.items() if state.batches != seen]
        if behind:
            shown = ", ".join(behind[:5]) + (f" and {len(behind) - 5} more" if len(behind) > 5 else "")
            raise UserError(f"SIFT layers that did not run in every calibration batch ({seen}): {shown}")
        if seen < self.config.calibration_batches:
            runtime.log(f"SIFT selection: {seen} of {self.config.calibration_batches} calibration batches ran")

    def _choose(self, states: list[_MatrixState]) -> list[torch.Tensor]:
        """Per state: positions into its pool of the entries that train."""
        if self.config.scope == "per_matrix":
            return [top_k_positions(state.score, state.layer.k) for state in states]
        keep = top_k_positions(torch.cat([state.score for state in states]), self.handle.global_budget)
        starts = [0, *itertools.accumulate(state.pool.numel() for state in states)]
        edges = torch.searchsorted(keep, torch.tensor(starts, device=keep.device)).tolist()
        return [keep[edges[i] : edges[i + 1]] - starts[i] for i in range(len(states))]

    def _agree_across_ranks(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Rank 0's indices on every rank (sizes first, then the concatenated positions)."""
        if not self._distributed():
            return indices
        device = indices[0].device
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        counts = torch.tensor([t.numel() for t in indices], dtype=torch.int64, device=device)
        dist.broadcast(counts, src=src, group=self.group)
        if dist.get_rank() == src:
            flat = torch.cat(indices)
        else:
            flat = torch.empty(int(counts.sum()), dtype=torch.int64, device=device)
        dist.broadcast(flat, src=src, group=self.group)
        return list(flat.split(counts.tolist()))

    def _report(self, states: list[_MatrixState], chosen: list[torch.Tensor], start: float) -> SelectionReport:
        # One stacked tensor per quantity, so the device syncs once.
        totals = torch.stack([torch.stack(state.totals).sum(0) for state in states]).cpu()
        kept = torch.stack(
            [torch.stack([state.score[pos].sum(), state.grad_sq[pos].sum()]) for state, pos in zip(states, chosen, strict=True)]
        ).cpu()
        matrices = []
        for i, state in enumerate(states):
            layer = state.layer
            matrices.append(
                MatrixSelection(
                    name=layer.sift_name,
                    shape=(layer.out_features, layer.in_features),
                    selected=layer.k,
                    density=layer.k / layer.numel_weight,
                    score_share=_share(kept[i, 0], totals[i, 0]),
                    grad_sq_share=_share(kept[i, 1], totals[i, 1]),
                )
            )
        selected = sum(m.selected for m in matrices)
        entries = sum(state.layer.numel_weight for state in states)
        now = time.perf_counter()
        return SelectionReport(
            metric=self.config.metric,
            scope=self.config.scope,
            batches=self.batches,
            matrices=matrices,
            selected=selected,
            entries=entries,
            density=selected / entries,
            score_share=_share(kept[:, 0].sum(), totals[:, 0].sum()),
            grad_sq_share=_share(kept[:, 1].sum(), totals[:, 1].sum()),
            calibration_seconds=now - (self._started or start),
            finalize_seconds=now - start,
        )


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    whole = float(whole)
    return float(part) / whole if whole > 0 else 0.0
