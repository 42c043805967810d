"""PNG figures of an analysis (matplotlib, Agg backend); each is written through a temporary file and a rename."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sift_llm.plotting import pyplot, save_figure

SHARES_PNG = "shares_per_matrix.png"
COVERAGE_PNG = "coverage.png"
LAYERS_PNG = "layers_heatmap.png"
DENSITY_PNG = "density_curve.png"

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def plot_shares(models: dict[str, Any], path: Path, model_name: str) -> Path:
    """Figure 3d: share of each matrix's squared gradient norm held by its top entries, pretrained vs random.

    One panel per module type with the layer on the x axis (a single panel in module order when the matrix
    names carry no layer index).
    """
    plt = pyplot()
    reference = next(iter(models.values()))["matrices"]
    labels = list(reference[0]["top_share"])
    layered = all(row["layer"] is not None for row in reference)
    types = list(dict.fromkeys(row["type"] for row in reference)) if layered else [None]
    columns = min(4, len(types) + 1)
    rows_n = math.ceil((len(types) + 1) / columns)
    fig, axes = plt.subplots(rows_n, columns, figsize=(3.2 * columns, 2.6 * rows_n), squeeze=False,
                             sharey=True)
    flat = [ax for line in axes for ax in line]
    styles = {"pretrained": ("-", 1.0), "random_init": ("--", 0.7)}
    for ax, kind in zip(flat, types):
        for key, result in models.items():
            line, alpha = styles.get(key, ("-", 1.0))
            matrices = [row for row in result["matrices"] if kind is None or row["type"] == kind]
            x = [row["layer"] for row in matrices] if layered else list(range(len(matrices)))
            for colour, label in zip(_COLOURS, labels):
                ax.plot(x, [row["top_share"][label] for row in matrices], line, color=colour, alpha=alpha,
                        linewidth=1.2, label=f"top {label} ({key.replace('_', ' ')})")
        ax.set_title(kind or "all matrices", fontsize=9)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("layer" if layered else "matrix (module order)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("share of sum g²", fontsize=8)
    legend_ax = flat[len(types)]
    handles, names = flat[0].get_legend_handles_labels()
    legend_ax.legend(handles, names, fontsize=7, loc="center", frameon=False)
    for ax in flat[len(types):]:
        ax.axis("off")
    fig.suptitle(f"{model_name}: share of each matrix's gradient norm² held by its top entries "
                 "(solid: pretrained, dashed: random init; mean over batches)", fontsize=10)
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_coverage(models: dict[str, Any], path: Path, model_name: str) -> Path:
    """Figure 4: batch 1's top set on later batches vs each batch's own top set; overlap of the top sets."""
    plt = pyplot()
    pretrained = models["pretrained"]
    label = pretrained["coverage"]["label"]
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for key, result in models.items():
        rows = result["coverage"]["per_batch"]
        x = [row["batch"] for row in rows]
        dashed = key != "pretrained"
        name = key.replace("_", " ")
        ax.plot(x, [row["own_top"] for row in rows], "o--" if dashed else "o-", color="#1f77b4",
                alpha=0.6 if dashed else 1, label=f"own top {label} ({name})")
        ax.plot(x, [row["first_batch_top"] for row in rows], "s--" if dashed else "s-", color="#d62728",
                alpha=0.6 if dashed else 1, label=f"batch 1's top {label} ({name})")
    ax.set_xlabel("batch")
    ax.set_xticks(x)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of the batch's sum g² (pooled)")
    ax.set_title("Does batch 1's top set keep later batches' gradient?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    overlap = pretrained["coverage"]["overlap_matrix"]
    image = heat.imshow(overlap, vmin=0, vmax=1, cmap="viridis")
    n = len(overlap)
    heat.set_xticks(range(n), [str(i + 1) for i in range(n)])
    heat.set_yticks(range(n), [str(i + 1) for i in range(n)])
    if n <= 12:
        for i in range(n):
            for j in range(n):
                heat.text(j, i, f"{overlap[i][j]:.2f}", ha="center", va="center", fontsize=7,
                          color="white" if overlap[i][j] < 0.6 else "black")
    heat.set_xlabel("batch")
    heat.set_ylabel("batch")
    heat.set_title(f"overlap of top-{label} sets (pretrained)", fontsize=10)
    fig.colorbar(image, ax=heat, fraction=0.046)
    fig.suptitle(model_name, fontsize=10)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_layers(result: dict[str, Any], path: Path, model_name: str) -> Path | None:
    """Layers x module types: gradient intensity (norm² share / parameter share) and top-set share."""
    matrices = [row for row in result["matrices"] if row["layer"] is not None]
    if not matrices:
        return None
    layers = sorted({row["layer"] for row in matrices})
    types = list(dict.fromkeys(row["type"] for row in matrices))
    label = result["coverage"]["label"]
    total_params = sum(row["numel"] for row in result["matrices"])
    batches = len(result["losses"])
    totals = [sum(row["grad_norm_sq"][b] for row in result["matrices"]) for b in range(batches)]
    intensity = [[math.nan] * len(types) for _ in layers]
    top = [[math.nan] * len(types) for _ in layers]
    for row in matrices:
        i, j = layers.index(row["layer"]), types.index(row["type"])
        fraction = sum(row["grad_norm_sq"][b] / totals[b] for b in range(batches) if totals[b] > 0) / batches
        intensity[i][j] = fraction / (row["numel"] / total_params)
        top[i][j] = _mean_or_nan(row["coverage"]["own_top"])
    plt = pyplot()
    from matplotlib.colors import LogNorm

    height = max(3.5, 0.16 * len(layers) + 1.8)
    fig, axes = plt.subplots(1, 2, figsize=(10, height))
    finite = [v for line in intensity for v in line if v > 0 and not math.isnan(v)]
    norm = LogNorm(vmin=min(finite), vmax=max(finite)) if finite and min(finite) < max(finite) else None
    panels = [
        (axes[0], intensity, "gradient norm² share / parameter share", "magma", norm),
        (axes[1], top, f"share of sum g² in the top {label}", "viridis", None),
    ]
    for ax, data, title, cmap, scale in panels:
        kwargs = {"norm": scale} if scale is not None else {"vmin": 0, "vmax": 1}
        image = ax.imshow(data, aspect="auto", cmap=cmap, **kwargs)
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        step = max(1, math.ceil(len(layers) / 30))
        ax.set_yticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)], fontsize=7)
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[0].set_ylabel("layer")
    fig.suptitle(f"{model_name} ({result['label']}): which layers and projections carry the gradient", fontsize=10)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _mean_or_nan(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def plot_density(models: dict[str, Any], path: Path, model_name: str) -> Path:
    """Kept share of the pooled squared gradient norm against density; the keep line and the suggestion."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    keep = models["pretrained"]["density"]["keep"]
    for key, result in models.items():
        d = result["density"]
        dashed = key != "pretrained"
        name = key.replace("_", " ")
        ax.plot(d["grid"], d["own_top_curve"], "--" if dashed else "-", color="#1f77b4",
                label=f"each batch's own top set ({name})")
        if d["first_batch_curve"] is not None:
            ax.plot(d["first_batch_grid"], d["first_batch_curve"], "--" if dashed else "-", color="#d62728",
                    label=f"batch 1's top set on later batches ({name})")
        if d["suggested"] is not None and not dashed:
            ax.axvline(d["suggested"], color="#1f77b4", linestyle=":", linewidth=1)
            ax.annotate(f"{d['suggested'] * 100:.3g}%", (d["suggested"], 0.02), fontsize=8, color="#1f77b4")
    ax.axhline(keep, color="grey", linestyle=":", linewidth=1, label=f"keep {keep:.0%}")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("density (fraction of each matrix)")
    ax.set_ylabel("share of sum g² kept (pooled over matrices)")
    ax.set_title(f"{model_name}: gradient norm² kept by per-matrix top-x%", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def write_plots(models: dict[str, Any], directory: Path, model_name: str) -> list[Path]:
    written = [
        plot_shares(models, directory / SHARES_PNG, model_name),
        plot_coverage(models, directory / COVERAGE_PNG, model_name),
        plot_layers(models["pretrained"], directory / LAYERS_PNG, model_name),
        plot_density(models, directory / DENSITY_PNG, model_name),
    ]
    return [path for path in written if path is not None]
