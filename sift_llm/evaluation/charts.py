"""PNG charts of evaluation reports: change bars (tuned minus base, with 2-standard-error whiskers),
absolute score bars for a report without a base, and training curves (train and held-out loss on one
axis, one panel per run). Matplotlib on the Agg backend; every PNG is written atomically."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sift_llm.evaluation.results import Delta, Row, score, series
from sift_llm.plotting import pyplot, save_figure

NOISE_NOTE = ("whiskers: ±2 standard errors of the change (of the scores, where no answer changed); "
              "faded, hatched bars are within noise")


def _bar(ax, x: float, width: float, d: Delta, scale: float, color: str, fmt: str) -> None:
    """One delta bar with a ±2 se whisker and its value; faded and hatched when within noise."""
    value = scale * d.value
    error = 2 * scale * d.resolution if d.resolution is not None else 0.0
    quiet = d.within_noise is not False
    ax.bar(x, value, width, yerr=error, capsize=3, color=color, alpha=0.45 if quiet else 1.0,
           hatch="//" if quiet else None, edgecolor=color, linewidth=0.8)
    offset = error if value >= 0 else -error
    ax.annotate(fmt.format(value), (x, value + offset), ha="center", va="bottom" if value >= 0 else "top",
                fontsize=7, xytext=(0, 2 if value >= 0 else -2), textcoords="offset points")


def _frame(ax, labels: list[str], min_span: float) -> None:
    """Zero line, tick labels, grid; the y range spans at least ``min_span`` either side of zero, so a
    change of zero does not fill the panel."""
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.grid(axis="y", alpha=0.3)
    low, high = ax.get_ylim()
    low, high = min(low, -min_span), max(high, min_span)
    pad = 0.12 * (high - low)
    ax.set_ylim(low - pad, high + pad)


def plot_deltas(
    likelihood: list[tuple[str, str, Delta | None]],
    benchmark_rows: list[Row],
    benchmark: list[tuple[str, str, list[Delta | None]]],
    path: Path,
    title: str,
) -> Path:
    """Change of each tuned model against its base: the held-out NLL per token (left, when measured) and
    the benchmark accuracy per summary row (right), each bar with ±2 standard errors."""
    from matplotlib.patches import Patch

    plt = pyplot()
    has_likelihood = any(d is not None for _, _, d in likelihood)
    widths = ([1.4 + 0.8 * len(likelihood)] if has_likelihood else []) + (
        [max(4.0, 0.9 * len(benchmark_rows) * max(1, len(benchmark)) / 2 + 2.5)] if benchmark_rows else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(sum(widths) + 1, 4.6),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    try:
        axes = list(axes[0])
        if has_likelihood:
            ax = axes.pop(0)
            for x, (label, color, d) in enumerate(likelihood):
                if d is None:
                    continue
                _bar(ax, x, 0.6, d, 1.0, color, "{:+.3f}")
            _frame(ax, [label for label, _, _ in likelihood], min_span=0.01)
            ax.set_ylabel("Δ NLL per response token (nats)")
            ax.set_title("Held-out likelihood (lower is better)", fontsize=10)
        if benchmark_rows:
            ax = axes.pop(0)
            width = 0.8 / max(len(benchmark), 1)
            for i, (label, color, deltas) in enumerate(benchmark):
                for j, d in enumerate(deltas):
                    if d is not None:
                        _bar(ax, j + (i - (len(benchmark) - 1) / 2) * width, width, d, 100.0, color, "{:+.1f}")
            _frame(ax, [r.label.replace("_", " ") for r in benchmark_rows], min_span=1.0)
            ax.legend(handles=[Patch(color=color, label=label) for label, color, _ in benchmark], fontsize=7)
            ax.set_ylabel("Δ accuracy (percentage points)")
            ax.set_title("Benchmark accuracy", fontsize=10)
        fig.suptitle(f"{title}: tuned − base\n{NOISE_NOTE}", fontsize=10)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_scores(columns: list[Any], rows: list[Row], path: Path, title: str) -> Path:
    """Grouped bars of absolute scores: one group per summary row, one bar (with a stderr whisker) per column."""
    plt = pyplot()
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) * max(1, len(columns)) / 2 + 3), 4.5))
    try:
        for i, column in enumerate(columns):
            values, errors = [], []
            for row in rows:
                s = score(column.results, row.name)
                values.append(100 * s.value if s and s.value is not None else float("nan"))
                errors.append(100 * s.stderr if s and s.stderr is not None else 0.0)
            xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))]
            bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=column.label, color=f"C{i % 10}")
            for bar, value, error in zip(bars, values, errors):
                if not math.isnan(value):
                    ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value + error),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.label.replace("_", " ") for r in rows], rotation=20 if len(rows) > 4 else 0)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_training_curves(
    runs: list[tuple[str, list[dict[str, Any]]]],
    path: Path,
    colors: dict[str, str] | None = None,
    harness_points: dict[str, list[tuple[int, float]]] | None = None,
) -> Path | None:
    """One panel per run (shared y axis): train loss (solid), the trainer's held-out loss (dashed, dots)
    and the harness's held-out NLL of the base and tuned model (stars), all mean NLL per token."""
    colors = colors or {}
    harness_points = harness_points or {}
    runs = [(label, records) for label, records in runs if any("loss" in r or "eval_loss" in r for r in records)]
    if not runs:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(runs), figsize=(max(7.0, 4.2 * len(runs)), 4.3), sharey=True, squeeze=False)
    try:
        for i, (ax, (label, records)) in enumerate(zip(axes[0], runs)):
            color = colors.get(label, f"C{i % 10}")
            steps, losses = series(records, "loss")
            if steps:
                ax.plot(steps, losses, color=color, linewidth=1.0, alpha=0.7, label="train loss")
            steps, losses = series(records, "eval_loss")
            if steps:
                ax.plot(steps, losses, color=color, linestyle="--", marker="o", markersize=4,
                        label="held-out loss (trainer)")
            points = harness_points.get(label) or []
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="none", marker="*", markersize=11,
                        color="black", label="held-out NLL (lm-eval, base / tuned)")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("step")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("loss (mean NLL per token)")
        fig.suptitle("Training curves", fontsize=11)
        fig.tight_layout()
        return save_figure(fig, path)
    finally:
        plt.close(fig)
