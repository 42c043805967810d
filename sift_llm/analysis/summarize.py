"""Per-matrix records -> the numbers of the analysis: shares, coverage, breakdown, suggested density.

Two ways of pooling matrices are reported. *pooled*: the share of the whole targeted gradient's squared norm
kept when every matrix keeps its own top set (sum over matrices of kept mass / sum of total mass); it weights
each matrix by its gradient mass. *matrix_mean*: the plain mean of per-matrix shares; each matrix counts once,
as each gets its own top-x% in SIFT. Every number is computed per batch first and then averaged over batches.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from sift_llm.analysis.config import AnalysisConfig
from sift_llm.analysis.gradients import ModelStatistics, layer_index, module_type
from sift_llm.analysis.stats import MatrixTracker

_EPS = 1e-12


def share_label(share: float) -> str:
    """0.001 -> '0.1%', 0.01 -> '1%'."""
    return f"{share * 100:.6g}%"


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _spread(values: list[float]) -> dict[str, float]:
    finite = sorted(v for v in values if not math.isnan(v))
    if not finite:
        return {}

    def q(p: float) -> float:
        return finite[min(len(finite) - 1, max(0, math.ceil(p * len(finite)) - 1))]

    return {
        "min": finite[0],
        "p25": q(0.25),
        "median": statistics.median(finite),
        "p75": q(0.75),
        "p90": q(0.9),
        "max": finite[-1],
        "mean": sum(finite) / len(finite),
    }


def _pooled(trackers: list[MatrixTracker], batch: int, part) -> float:
    kept = sum(part(t.records[batch]) for t in trackers)
    return _ratio(kept, sum(t.records[batch].norm_sq for t in trackers))


def _first_reaching(grid: list[float], curve: list[float], keep: float) -> tuple[float | None, float | None]:
    for density, value in zip(grid, curve):
        if value >= keep * (1 - _EPS):
            return density, value
    return None, None


def matrix_rows(stats: ModelStatistics, acfg: AnalysisConfig) -> list[dict[str, Any]]:
    """Per-matrix numbers, each averaged over batches (per-batch values alongside)."""
    rows = []
    labels = [share_label(s) for s in acfg.shares]
    for t in stats.trackers:
        recs = t.records
        per_batch = {
            label: [_ratio(r.top_sq[i], r.norm_sq) for r in recs] for i, label in enumerate(labels)
        }
        rows.append(
            {
                "name": t.name,
                "layer": layer_index(t.name),
                "type": module_type(t.name),
                "shape": list(t.shape),
                "numel": t.numel,
                "grad_norm_sq": [r.norm_sq for r in recs],
                "top_share": {label: _mean(values) for label, values in per_batch.items()},
                "top_share_per_batch": per_batch,
                "top_l1_share": {
                    label: _mean([_ratio(r.top_l1[i], r.l1) for r in recs]) for i, label in enumerate(labels)
                },
                "min_density": _mean([r.min_density for r in recs]),
                "min_density_per_batch": [r.min_density for r in recs],
                "coverage": {
                    "own_top": [_ratio(r.cover_own_sq, r.norm_sq) for r in recs],
                    "first_batch": [_ratio(r.cover_first_sq, r.norm_sq) for r in recs],
                    "overlap_with_first": [t.overlap(0, b) / t.cover_k for b in range(len(recs))],
                },
            }
        )
    return rows


def overall(stats: ModelStatistics, rows: list[dict], acfg: AnalysisConfig) -> dict[str, Any]:
    trackers, batches = stats.trackers, len(stats.trackers[0].records)
    out: dict[str, Any] = {"top_share": {}, "top_l1_share": {}}
    for i, share in enumerate(acfg.shares):
        label = share_label(share)
        per_matrix = [row["top_share"][label] for row in rows]
        pooled = [_pooled(trackers, b, lambda r: r.top_sq[i]) for b in range(batches)]
        out["top_share"][label] = {
            "pooled": _mean(pooled),
            "pooled_per_batch": pooled,
            "matrix_mean": _mean(per_matrix),
            "matrix_min": min(per_matrix),
            "matrix_median": statistics.median(per_matrix),
            "matrix_max": max(per_matrix),
        }
        l1 = [
            _ratio(sum(t.records[b].top_l1[i] for t in trackers), sum(t.records[b].l1 for t in trackers))
            for b in range(batches)
        ]
        out["top_l1_share"][label] = {
            "pooled": _mean(l1),
            "matrix_mean": _mean([row["top_l1_share"][label] for row in rows]),
        }
    return out


def coverage(stats: ModelStatistics, acfg: AnalysisConfig) -> dict[str, Any]:
    trackers, batches = stats.trackers, len(stats.trackers[0].records)
    total_k = sum(t.cover_k for t in trackers)
    per_batch = []
    for b in range(batches):
        own = _pooled(trackers, b, lambda r: r.cover_own_sq)
        first = _pooled(trackers, b, lambda r: r.cover_first_sq)
        per_batch.append(
            {
                "batch": b + 1,
                "own_top": own,
                "first_batch_top": first,
                "first_over_own": _ratio(first, own),
                "own_top_matrix_mean": _mean([_ratio(t.records[b].cover_own_sq, t.records[b].norm_sq) for t in trackers]),
                "first_batch_top_matrix_mean": _mean(
                    [_ratio(t.records[b].cover_first_sq, t.records[b].norm_sq) for t in trackers]
                ),
                "overlap_with_first": sum(t.overlap(0, b) for t in trackers) / total_k,
            }
        )
    overlap = [[sum(t.overlap(a, b) for t in trackers) / total_k for b in range(batches)] for a in range(batches)]
    later = per_batch[1:]
    return {
        "share": acfg.coverage_share,
        "label": share_label(acfg.coverage_share),
        "per_batch": per_batch,
        "later_batches_mean": {
            key: _mean([row[key] for row in later])
            for key in ("own_top", "first_batch_top", "first_over_own", "overlap_with_first")
        }
        if later
        else None,
        "overlap_matrix": overlap,
    }


def _group_rows(stats: ModelStatistics, key) -> list[dict[str, Any]]:
    trackers, batches = stats.trackers, len(stats.trackers[0].records)
    groups: dict[Any, list[MatrixTracker]] = defaultdict(list)
    for t in trackers:
        groups[key(t.name)].append(t)
    total_params = sum(t.numel for t in trackers)
    totals = [sum(t.records[b].norm_sq for t in trackers) for b in range(batches)]
    rows = []
    for group, members in groups.items():
        params = sum(t.numel for t in members)
        fraction = _mean([_ratio(sum(t.records[b].norm_sq for t in members), totals[b]) for b in range(batches)])
        rows.append(
            {
                "group": group,
                "matrices": len(members),
                "params": params,
                "param_fraction": params / total_params,
                "grad_norm_fraction": fraction,
                "intensity": _ratio(fraction, params / total_params),
                "top_share": _mean([_pooled(members, b, lambda r: r.cover_own_sq) for b in range(batches)]),
                "first_batch_coverage": _mean([_pooled(members, b, lambda r: r.cover_first_sq) for b in range(1, batches)])
                if batches > 1
                else None,
            }
        )
    return rows


def breakdown(stats: ModelStatistics, acfg: AnalysisConfig, top: int = 5) -> dict[str, Any]:
    """Per layer and per module type: share of the gradient's squared norm vs share of the parameters.

    ``intensity`` = grad_norm_fraction / param_fraction (1: as much gradient as its size; the ranking key of the
    most critical groups); ``top_share``: share of the group's squared norm in its matrices' top sets at
    coverage_share.
    """
    layers = sorted(
        _group_rows(stats, layer_index), key=lambda r: (r["group"] is None, r["group"] if r["group"] is not None else 0)
    )
    types = _group_rows(stats, module_type)

    def ranked(rows):
        return [r["group"] for r in sorted(rows, key=lambda r: -_nan_low(r["intensity"]))][:top]

    return {
        "share": acfg.coverage_share,
        "label": share_label(acfg.coverage_share),
        "layers": layers,
        "module_types": types,
        "most_critical_layers": ranked([r for r in layers if r["group"] is not None]),
        "most_critical_module_types": ranked(types),
    }


def _nan_low(value: float) -> float:
    return -math.inf if value is None or math.isnan(value) else value


def density(stats: ModelStatistics, rows: list[dict], acfg: AnalysisConfig) -> dict[str, Any]:
    """The smallest density that keeps ``keep`` of the squared gradient norm, from each batch's own top sets.

    ``suggested``: smallest grid density (log grid, 80 points a decade) whose per-matrix top sets keep ``keep``
    of the pooled squared norm, averaged over batches. ``suggested_first_batch``: the same for batch 1's fixed
    top sets measured on the later batches (what SIFT trains), searched up to cover_max. ``per_matrix``: the
    spread of each matrix's exact minimal density (batch-averaged).
    """
    trackers, batches = stats.trackers, len(stats.trackers[0].records)
    grid = trackers[0].grid
    own_curve = [
        _mean([_pooled(trackers, b, lambda r, j=j: r.grid_sq[j]) for b in range(batches)]) for j in range(len(grid))
    ]
    suggested, kept = _first_reaching(grid, own_curve, acfg.keep)
    first_grid = trackers[0].first_grid
    first_curve = None
    first_suggested = first_kept = None
    if batches > 1:
        first_curve = [
            _mean([_pooled(trackers, b, lambda r, j=j: r.first_grid_sq[j]) for b in range(1, batches)])
            for j in range(len(first_grid))
        ]
        first_suggested, first_kept = _first_reaching(first_grid, first_curve, acfg.keep)
    reaching = None
    if suggested is not None:
        j = grid.index(suggested)
        per_matrix_at = [
            _mean([_ratio(r.grid_sq[j], r.norm_sq) for r in t.records]) for t in trackers
        ]
        reaching = sum(v >= acfg.keep * (1 - _EPS) for v in per_matrix_at) / len(per_matrix_at)
    return {
        "keep": acfg.keep,
        "suggested": suggested,
        "kept_at_suggested": kept,
        "matrices_reaching_keep_at_suggested": reaching,
        "suggested_first_batch": first_suggested,
        "kept_at_suggested_first_batch": first_kept,
        "first_batch_searched_up_to": acfg.cover_max,
        "per_matrix": _spread([row["min_density"] for row in rows]),
        "grid": grid,
        "own_top_curve": own_curve,
        "first_batch_grid": first_grid,
        "first_batch_curve": first_curve,
    }


def summarize_model(stats: ModelStatistics, acfg: AnalysisConfig) -> dict[str, Any]:
    rows = matrix_rows(stats, acfg)
    return {
        "label": stats.label,
        "losses": stats.losses,
        "seconds": round(stats.seconds, 2),
        "statistics_seconds": round(stats.statistics_seconds, 2),
        "matrices": rows,
        "overall": overall(stats, rows, acfg),
        "coverage": coverage(stats, acfg),
        "breakdown": breakdown(stats, acfg),
        "density": density(stats, rows, acfg),
    }
