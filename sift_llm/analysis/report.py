"""analysis.json (every number) and summary.md (short tables) of an analysis."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sift_llm.fsio import atomic_write_json, atomic_write_text

JSON_NAME = "analysis.json"
SUMMARY_NAME = "summary.md"

DEFINITION = (
    "Share of the gradient norm held by a set of entries = sum of g^2 over the set / sum of g^2 over the matrix "
    "(share of the squared L2 norm), g being one micro-batch's gradient of the loss for one weight matrix. "
    "Top x% of a matrix = its round(x * entries) entries with the largest |g| (at least one). top_l1_share is "
    "the same with |g| instead of g^2. pooled = summed over matrices before dividing (mass-weighted); "
    "matrix_mean = mean of per-matrix shares. Every number is computed per batch, then averaged over batches."
)


def clean(value: Any, digits: int = 7) -> Any:
    """Floats rounded to ``digits`` significant digits and NaN/inf -> None, recursively (strict, compact JSON)."""
    if isinstance(value, float):
        return float(f"{value:.{digits}g}") if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: clean(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(item, digits) for item in value]
    return value


def _pct(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value * 100:.{digits}f}%"


def _density(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:.3g}%"


def render_summary(result: dict[str, Any], figures: list[str]) -> str:
    setup = result["setup"]
    models = result["models"]
    pre = models["pretrained"]
    rnd = models.get("random_init")
    lines = [
        f"# Gradient sparsity: {setup['model_name']}",
        "",
        f"{setup['batches']} micro-batches of {setup['micro_batch_size']} examples from `{setup['data']}` "
        f"(max length {setup['max_length']}, {setup['learned_tokens']} learned tokens in all), "
        f"{setup['matrices']} matrices ({', '.join(setup['module_types'])}), {setup['entries']:,} entries, "
        f"{setup['dtype']} on {setup['device']}.",
        "",
        "Share = share of a matrix's **squared** gradient norm (sum of g²) held by its top entries by |g|; "
        "*pooled* sums over all matrices before dividing, *matrix mean* averages the per-matrix shares. "
        "Averaged over batches.",
        "",
        "## Top entries' share of the gradient norm²",
        "",
    ]
    header = "| top | pretrained, pooled | pretrained, matrix mean (min-max) |"
    rule = "|---|---|---|"
    if rnd:
        header += " random init, pooled | random init, matrix mean (min-max) |"
        rule += "---|---|"
    lines += [header, rule]
    for label, row in pre["overall"]["top_share"].items():
        line = (
            f"| {label} | {_pct(row['pooled'])} | {_pct(row['matrix_mean'])} "
            f"({_pct(row['matrix_min'])}-{_pct(row['matrix_max'])}) |"
        )
        if rnd:
            r = rnd["overall"]["top_share"][label]
            line += f" {_pct(r['pooled'])} | {_pct(r['matrix_mean'])} ({_pct(r['matrix_min'])}-{_pct(r['matrix_max'])}) |"
        lines.append(line)

    cov = pre["coverage"]
    label = cov["label"]
    lines += [
        "",
        f"## Batch 1's top-{label} set on later batches (pretrained)",
        "",
        f"| batch | own top {label} | batch 1's top {label} | batch 1's / own | overlap with batch 1 |",
        "|---|---|---|---|---|",
    ]
    for row in cov["per_batch"]:
        lines.append(
            f"| {row['batch']} | {_pct(row['own_top'])} | {_pct(row['first_batch_top'])} | "
            f"{_pct(row['first_over_own'])} | {_pct(row['overlap_with_first'])} |"
        )
    if cov["later_batches_mean"]:
        mean = cov["later_batches_mean"]
        lines.append(
            f"| mean of 2-{len(cov['per_batch'])} | {_pct(mean['own_top'])} | {_pct(mean['first_batch_top'])} | "
            f"{_pct(mean['first_over_own'])} | {_pct(mean['overlap_with_first'])} |"
        )
    if rnd and rnd["coverage"]["later_batches_mean"]:
        mean = rnd["coverage"]["later_batches_mean"]
        lines += ["", f"Random init, later batches: own top {label} {_pct(mean['own_top'])}, batch 1's "
                  f"{_pct(mean['first_batch_top'])}, overlap {_pct(mean['overlap_with_first'])}."]

    brk = pre["breakdown"]
    lines += [
        "",
        "## Most critical layers and module types (pretrained)",
        "",
        "Ranked by intensity = share of the gradient norm² / share of the parameters.",
        "",
        f"| layer | norm² share | params share | intensity | top-{label} share |",
        "|---|---|---|---|---|",
    ]
    by_layer = {row["group"]: row for row in brk["layers"]}
    for layer in brk["most_critical_layers"]:
        row = by_layer[layer]
        lines.append(
            f"| {layer} | {_pct(row['grad_norm_fraction'])} | {_pct(row['param_fraction'])} | "
            f"{row['intensity']:.2f} | {_pct(row['top_share'])} |"
        )
    lines += ["", f"| module type | norm² share | params share | intensity | top-{label} share |", "|---|---|---|---|---|"]
    for row in sorted(brk["module_types"], key=lambda r: -(r["intensity"] or 0.0)):
        name = row["group"]
        lines.append(
            f"| {name} | {_pct(row['grad_norm_fraction'])} | {_pct(row['param_fraction'])} | "
            f"{row['intensity']:.2f} | {_pct(row['top_share'])} |"
        )

    d = pre["density"]
    keep = _pct(d["keep"], 0)
    spread = d["per_matrix"]
    lines += [
        "",
        f"## Suggested density (keep {keep} of the gradient norm²)",
        "",
        f"- **{_density(d['suggested'])}** per matrix: each batch's own top set then keeps "
        f"{_pct(d['kept_at_suggested'])} of the pooled norm² (smallest point of an 80-per-decade log grid); "
        f"{_pct(d['matrices_reaching_keep_at_suggested'], 0)} of the matrices reach {keep} on their own.",
    ]
    if d["first_batch_curve"] is not None:
        if d["suggested_first_batch"] is not None:
            lines.append(
                f"- **{_density(d['suggested_first_batch'])}** if batch 1's top set is kept fixed (as SIFT trains): "
                f"it keeps {_pct(d['kept_at_suggested_first_batch'])} of later batches' norm²."
            )
        else:
            lines.append(
                f"- Batch 1's fixed top set does not reach {keep} of later batches' norm² at any density up to "
                f"{_density(d['first_batch_searched_up_to'])} (the largest set measured; it keeps "
                f"{_pct(d['first_batch_curve'][-1])} there; add a larger share to --shares to search further)."
            )
    if spread:
        lines.append(
            f"- Per matrix, the exact minimal density: median {_density(spread['median'])}, "
            f"p90 {_density(spread['p90'])}, max {_density(spread['max'])} (min {_density(spread['min'])})."
        )
    if rnd:
        lines.append(f"- Random init needs {_density(rnd['density']['suggested'])} for the same {keep}.")
    lines += ["", "## Figures", ""]
    lines += [f"![{Path(name).stem}]({name})" for name in figures]
    lines += ["", f"Wall time {result['seconds']:.0f} s. All numbers: `{JSON_NAME}`.", ""]
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], directory: Path, figures: list[str]) -> tuple[Path, Path]:
    """summary.md, then analysis.json (written last: its presence means the analysis is complete)."""
    summary = atomic_write_text(directory / SUMMARY_NAME, render_summary(result, figures))
    data = atomic_write_json(directory / JSON_NAME, clean(result))
    return data, summary
