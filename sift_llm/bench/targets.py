"""The issue's targets as ratios between rows of the same invocation, and whether each is met.

Every function takes plain result dicts (as in bench.json), so the logic is testable on synthetic numbers.
"""

from __future__ import annotations

GRADIENT_REDUCTIONS = ("all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter", "reduce",
                       "all_reduce_coalesced")
GATHERS = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "broadcast")


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def step_ratio(row: dict, base: dict | None) -> float | None:
    """Step time of ``row`` over ``base``: the median over rounds of the per-round ratio when both ran the same
    rounds (each round's runs sit minutes apart, so load on a shared machine cancels), else of pooled medians."""
    if base is None:
        return None
    mine, theirs = row.get("round_step_time_s"), base.get("round_step_time_s")
    if mine and theirs and len(mine) == len(theirs) and all(theirs):
        ratios = sorted(a / b for a, b in zip(mine, theirs))
        middle = len(ratios) // 2
        return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return ratio(row.get("step_time_s"), base.get("step_time_s"))


def peak(row: dict) -> float | None:
    """A row's peak memory: CUDA max allocated where measured, else peak RSS (the largest rank's)."""
    for key in ("cuda_max_allocated_bytes", "peak_bytes", "peak_rss_bytes"):
        if row.get(key) is not None:
            return row[key]
    return None


def reduced_bytes(row: dict) -> float | None:
    """Bytes handed to gradient reductions per step (all-reduce, reduce-scatter, reduce)."""
    counts = row.get("collective_bytes")
    if counts is None:
        return None
    return sum(counts.get(name, 0) for name in GRADIENT_REDUCTIONS)


def gathered_bytes(row: dict) -> float | None:
    counts = row.get("collective_bytes")
    if counts is None:
        return None
    return sum(counts.get(name, 0) for name in GATHERS)


def find(rows: list[dict], label: str) -> dict | None:
    return next((row for row in rows if row["label"] == label), None)


def baselines(rows: list[dict]) -> tuple[dict | None, dict | None]:
    """The first LoRA and the first full fine-tuning row: the references ratios are taken against."""
    lora = next((row for row in rows if row["method"] == "lora"), None)
    full = next((row for row in rows if row["method"] == "full"), None)
    return lora, full


def sift_rows(rows: list[dict]) -> list[dict]:
    """SIFT rows with the current kernels (no before/forced-path variants)."""
    return [row for row in rows if row["method"] == "sift" and not row.get("before") and "(" not in row["label"]]


def _target(scope: str, name: str, description: str, measured: float | None, limit: float, at_most: bool = True) -> dict:
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"scope": scope, "name": name, "target": description, "measured": measured, "limit": limit,
            "at_most": at_most, "met": met}


def cost_targets(rows: list[dict], scope: str, match_label: str, state_rows: list[dict] | None = None) -> list[dict]:
    """Memory, step-time, traffic, trainable-state and selection targets for one set of cost rows."""
    lora, full = baselines(rows)
    main = find(rows, match_label)
    out = []
    if main is not None:
        out.append(_target(scope, "memory_vs_lora", f"{match_label} peak memory <= 1.10x LoRA",
                           ratio(peak(main), peak(lora) if lora else None), 1.10))
        out.append(_target(scope, "memory_vs_full", f"{match_label} peak memory <= 0.35x full fine-tuning",
                           ratio(peak(main), peak(full) if full else None), 0.35))
    for row in sift_rows(rows):
        out.append(_target(scope, "step_vs_lora", f"{row['label']} step time <= 1.15x LoRA", step_ratio(row, lora), 1.15))
        out.append(_target(scope, "step_vs_full", f"{row['label']} step time <= 1.0x full fine-tuning",
                           step_ratio(row, full), 1.0))
    for row in sift_rows(rows):
        if row.get("collective_bytes") is not None and row.get("trainable"):
            out.append(_target(scope, "allreduce_bytes",
                               f"{row['label']} bytes all-reduced per step <= 1.1 x 4 B x selected",
                               ratio(reduced_bytes(row), 4 * row["trainable"]), 1.1))
    for row in state_rows or []:
        if row["method"] == "sift" and row.get("trainable"):
            per_entry = row["state_bytes"] / row["trainable"]
            index = row["index_bytes"] / row["trainable"]
            out.append(_target(scope, "state_bytes", f"{row['label']} trainable state <= 16 B + index B per entry",
                               ratio(per_entry, 16 + index), 1.0))
    if main is not None and main.get("selection_s") is not None:
        out.append(_target(scope, "selection_time", f"{match_label} selection pass <= 2x one step",
                           ratio(main["selection_s"], main.get("step_time_s")), 2.0))
    return out


def recovery(base_loss: float, sift_loss: float, full_loss: float) -> float | None:
    """Share of full fine-tuning's held-out loss reduction that SIFT achieves (1.0 = all of it)."""
    return ratio(base_loss - sift_loss, base_loss - full_loss) if full_loss < base_loss else None


def quality_targets(quality: dict, match_label: str = "sift-1%") -> list[dict]:
    full = find(quality["rows"], "full")  # the reference: full fine-tuning at its own (paper) rate
    sift = find(quality["rows"], match_label)
    if full is None or sift is None:
        return []
    base = quality["base"]["eval_loss"]
    out = [_target("quality", "recovery", f"{match_label} recovers >= 90% of full fine-tuning's held-out loss reduction",
                   recovery(base, sift["eval_loss"], full["eval_loss"]), 0.90, at_most=False)]
    for other in quality["rows"]:
        if other["method"] == "full" and other is not full:
            out.append(_target("quality", "recovery", f"{match_label} recovers >= 90% of {other['label']}'s reduction",
                               recovery(base, sift["eval_loss"], other["eval_loss"]), 0.90, at_most=False))
    return out


def cost_rows_with_state(cost: dict) -> list[dict]:
    """Cost rows with the selection time folded in, as the target functions read them."""
    rows = []
    for row in cost["rows"]:
        row = dict(row)
        if row.get("selection"):
            row["selection_s"] = row["selection"]["wall_s"]
        rows.append(row)
    return rows


def evaluate(results: dict) -> list[dict]:
    """Every target the results hold numbers for: CPU cost, quality, GPU layer stack."""
    parts = results.get("parts", {})
    out = []
    if "cost" in parts:
        cost = parts["cost"]
        match = f"sift-{cost['config']['lora_match_density'] * 100:g}%" if "config" in cost else "sift-1%"
        state = None
        if cost.get("state_probe"):
            methods = {row["label"]: row["method"] for row in cost["rows"]}
            state = [{**row, "method": methods.get(row["label"], "")} for row in cost["state_probe"]["rows"]]
        scope = f"cost ({cost.get('device_type', 'cpu')}, {cost.get('ranks', '?')} ranks)"
        out += cost_targets(cost_rows_with_state(cost), scope, match, state)
    if "quality" in parts:
        out += quality_targets(parts["quality"])
    if "layer_stack" in parts:
        stack = parts["layer_stack"]
        match = f"sift-{stack['lora_match_density'] * 100:g}%"
        rows = [{**row, "peak_bytes": row["peak_bytes"]} for row in stack["rows"]]
        state = [{"label": r["label"], "method": r["method"], "trainable": r["trainable"],
                  "state_bytes": r["state_bytes"], "index_bytes": r["index_bytes"]} for r in sift_rows(rows)]
        out += cost_targets(rows, f"layer stack ({stack['device']})", match, state)
    return out
