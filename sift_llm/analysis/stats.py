"""Sparsity statistics of one weight matrix's gradient, batch after batch, in O(top set) memory.

Definitions (g: the dense gradient of one matrix for one micro-batch, flattened; n entries):

- top-k set at density d: the k = min(n, max(1, round(d * n))) entries with the largest |g| (ties go to the lower
  flat position, as in SIFT's selection); the same count rule as ``sift.density``.
- share of the gradient norm held by a set S: sum_{i in S} g_i^2 / sum_i g_i^2, i.e. the share of the *squared*
  L2 norm. ``top_l1`` is the same with |g_i| (share of the L1 norm), reported alongside.
- coverage of batch b by batch 1's top set S_1: sum_{i in S_1} g_b,i^2 / sum_i g_b,i^2, against batch b's own
  top-k share (the upper bound for any set of that size).
- overlap of two top sets of equal size k: |S_a & S_b| / k.
- minimal density for a share q: the smallest k/n whose top-k set holds at least q of sum g^2 (exact, from the
  sorted cumulative sum).

Per batch a matrix costs one sort of |g| values, a float64 cumulative sum and a ranking of its top set; what is kept between batches is the first
batch's top ``cover_max`` indices in rank order (so its top set at every density up to cover_max is a prefix) and
every batch's top ``coverage_share`` set, both O(k) integers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from sift_llm.sift.config import density_count
from sift_llm.sift.layer import index_dtype
from sift_llm.sift.selection import top_k_positions


def density_grid(per_decade: int = 80, decades: int = 5, extra: list[float] = ()) -> list[float]:
    """Log-spaced densities from 10^-decades to 1 (plus ``extra``), ascending."""
    points = {10.0 ** (-decades + i / per_decade) for i in range(decades * per_decade + 1)}
    points.update(float(x) for x in extra)
    return sorted(p for p in points if 0.0 < p <= 1.0)


def sorted_descending(values: torch.Tensor) -> torch.Tensor:
    """``values`` (1-D float32) sorted largest first; on the CPU through NumPy's vectorised sort (~20x torch's)."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.ascontiguousarray(np.sort(values.numpy())[::-1]))
    return torch.sort(values, descending=True).values


def ranked_top(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest values, largest first; which ``k`` is SIFT's own choice (ties to the lower
    position), and only those O(k) entries are ranked."""
    positions = top_k_positions(magnitude, k)  # ascending positions
    order = torch.sort(magnitude[positions], descending=True, stable=True).indices
    return positions[order]


@dataclass
class BatchRecord:
    """One matrix, one batch: absolute masses (sums of g^2 or |g|); shares are these over ``norm_sq``/``l1``."""

    norm_sq: float
    l1: float
    top_sq: list[float]  # sum g^2 over the top set at each analysed share
    top_l1: list[float]  # sum |g| over the same sets
    grid_sq: list[float]  # sum g^2 over the own top set at each grid density
    min_density: float  # smallest density whose own top set keeps `keep` of norm_sq
    cover_own_sq: float  # sum g^2 over the own top set at coverage_share
    cover_first_sq: float  # sum g^2 over batch 1's top set at coverage_share (batch 1: == cover_own_sq)
    first_grid_sq: list[float]  # sum g^2 over batch 1's top set at each grid density <= cover_max


@dataclass
class MatrixTracker:
    """Accumulates :class:`BatchRecord` s for one matrix; feed it each batch's dense gradient with :meth:`observe`."""

    name: str
    shape: tuple[int, ...]
    shares: list[float]
    coverage_share: float
    cover_max: float
    keep: float
    grid: list[float]
    records: list[BatchRecord] = field(default_factory=list)
    top_sets: list[torch.Tensor] = field(default_factory=list)  # sorted indices (CPU) of each batch's coverage set
    first_order: torch.Tensor | None = None  # batch 1's top cover_max indices, largest |g| first

    def __post_init__(self) -> None:
        n = self.numel
        self._share_k = [density_count(s, n) for s in self.shares]
        self._grid_k = [density_count(d, n) for d in self.grid]
        self._cover_k = density_count(self.coverage_share, n)
        self._first_k = density_count(self.cover_max, n)
        self._first_grid_k = [density_count(d, n) for d in self.grid if d <= self.cover_max]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def first_grid(self) -> list[float]:
        return [d for d in self.grid if d <= self.cover_max]

    @torch.no_grad()
    def observe(self, grad: torch.Tensor) -> BatchRecord:
        """Fold one batch's dense gradient of this matrix into the record; ``grad`` is not kept."""
        flat = grad.detach().reshape(-1)
        if flat.numel() != self.numel:
            raise ValueError(f"{self.name}: gradient has {flat.numel()} entries, expected {self.numel}")
        magnitude = flat.abs().float()
        values = sorted_descending(magnitude)
        ordered = values.double()
        cum_sq = ordered.square().cumsum(0)
        cum_l1 = ordered.cumsum(0)
        norm_sq = float(cum_sq[-1])
        device = cum_sq.device

        def at(cumulative: torch.Tensor, counts: list[int]) -> list[float]:
            if not counts:
                return []
            return cumulative[torch.tensor(counts, device=device) - 1].tolist()

        target = torch.tensor([self.keep * norm_sq], dtype=cum_sq.dtype, device=device)
        needed = min(int(torch.searchsorted(cum_sq, target)) + 1, self.numel)
        cover_own_sq = float(cum_sq[self._cover_k - 1])

        if self.first_order is None:  # batch 1: its top set is the reference kept for later batches
            ranked = ranked_top(magnitude, self._first_k)
            self.first_order = ranked.to(index_dtype(self.numel))
            own_set = ranked[: self._cover_k]
            cover_first_sq = cover_own_sq
            first_grid_sq = at(cum_sq, self._first_grid_k)
        else:
            own_set = ranked_top(magnitude, self._cover_k)
            picked = flat[self.first_order.long()].double().square().cumsum(0)
            cover_first_sq = float(picked[self._cover_k - 1])
            first_grid_sq = at(picked, self._first_grid_k)
            del picked
        del values, ordered

        record = BatchRecord(
            norm_sq=norm_sq,
            l1=float(cum_l1[-1]),
            top_sq=at(cum_sq, self._share_k),
            top_l1=at(cum_l1, self._share_k),
            grid_sq=at(cum_sq, self._grid_k),
            min_density=(needed / self.numel) if norm_sq > 0 else 0.0,
            cover_own_sq=cover_own_sq,
            cover_first_sq=cover_first_sq,
            first_grid_sq=first_grid_sq,
        )
        self.top_sets.append(own_set.sort().values.to("cpu", index_dtype(self.numel)))
        self.records.append(record)
        return record

    def overlap(self, a: int, b: int) -> int:
        """|S_a & S_b|: entries shared by the coverage-size top sets of batches a and b (0-based)."""
        return int(torch.isin(self.top_sets[a], self.top_sets[b], assume_unique=True).sum())

    @property
    def cover_k(self) -> int:
        return self._cover_k
