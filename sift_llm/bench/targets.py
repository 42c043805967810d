"""Ratios between rows of the same invocation, and the bench config's targets checked against them.

The library computes the ratios (generic: memory, step time, traffic, trainable state, selection cost,
quality recovery); the limits they are held to are the bench's, set in the ``targets:`` section of a bench
YAML under ``benchmarks/`` (for example ``memory_vs_lora: 1.10``) and copied into bench.json with the
results. A ratio with no limit there is still computed and shown in the tables, but is no target.

Every function takes plain result dicts (as in bench.json), so the logic is testable on synthetic numbers.
"""

from __future__ import annotations

from collections.abc import Mapping

GRADIENT_REDUCTIONS = ("all_reduce", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter", "reduce",
                       "all_reduce_coalesced")
GATHERS = ("all_gather_into_tensor", "_all_gather_base", "all_gather", "broadcast")

# The targets a bench YAML may set, and whether each holds the measured ratio at most (True) or at least
# (False) at its limit. The limits themselves live in the YAML.
MEASURES: dict[str, bool] = {
    "memory_vs_lora": True,  # the LoRA-matched SIFT row's peak memory / LoRA's
    "memory_vs_full": True,  # ... / full fine-tuning's
    "step_vs_lora": True,  # every SIFT row's step time / LoRA's (per-round ratios, median)
    "step_vs_full": True,  # ... / full fine-tuning's
    "allreduce_bytes": True,  # bytes handed to gradient reductions per step / (4 B x selected)
    "state_bytes": True,  # trainable-state bytes per entry / (16 B + index bytes per entry)
    "selection_time": True,  # the selection pass's wall time / one step of the same run
    "selection_memory": True,  # the selection pass's peak memory / the training steps' peak
    "recovery": False,  # share of full fine-tuning's held-out loss reduction that SIFT achieves
}

Limits = Mapping[str, float]


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


def selection_ratio(row: dict) -> float | None:
    """The selection pass over one step of the same run: per round where both were recorded, median."""
    times = row.get("round_selection_s")
    steps = row.get("round_step_time_s")
    if times and steps and len(times) == len(steps) and all(steps) and all(t is not None for t in times):
        ratios = sorted(a / b for a, b in zip(times, steps))
        middle = len(ratios) // 2
        return ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return ratio(row.get("selection_s"), row.get("step_time_s"))


def peak(row: dict) -> float | None:
    """A row's peak memory: CUDA max allocated where measured, else peak RSS (the largest rank's)."""
    if row is None:
        return None
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
    """SIFT rows with the current kernels (no before/forced-path/scope variants)."""
    return [row for row in rows if row["method"] == "sift" and not row.get("before") and "(" not in row["label"]]


def unknown_targets(limits: Limits) -> list[str]:
    """Names in a ``targets:`` section that no ratio here measures."""
    return [name for name in limits if name not in MEASURES]


def _target(limits: Limits, scope: str, name: str, description: str, measured: float | None) -> dict | None:
    """A target row when the bench config sets a limit for ``name``; ``description`` may use ``{limit}``."""
    if name not in limits:
        return None
    limit, at_most = float(limits[name]), MEASURES[name]
    met = None if measured is None else (measured <= limit if at_most else measured >= limit)
    return {"scope": scope, "name": name, "target": description.format(limit=limit), "measured": measured,
            "limit": limit, "at_most": at_most, "met": met}


def cost_targets(rows: list[dict], scope: str, match_label: str, state_rows: list[dict] | None = None,
                 limits: Limits | None = None) -> list[dict]:
    """Memory, step-time, traffic, trainable-state and selection targets for one set of cost rows."""
    limits = limits or {}
    lora, full = baselines(rows)
    main = find(rows, match_label)
    out = []
    if main is not None:
        out.append(_target(limits, scope, "memory_vs_lora", f"{match_label} peak memory <= {{limit:g}}x LoRA",
                           ratio(peak(main), peak(lora) if lora else None)))
        out.append(_target(limits, scope, "memory_vs_full",
                           f"{match_label} peak memory <= {{limit:g}}x full fine-tuning",
                           ratio(peak(main), peak(full) if full else None)))
    for row in sift_rows(rows):
        out.append(_target(limits, scope, "step_vs_lora", f"{row['label']} step time <= {{limit:g}}x LoRA",
                           step_ratio(row, lora)))
        out.append(_target(limits, scope, "step_vs_full", f"{row['label']} step time <= {{limit:g}}x full fine-tuning",
                           step_ratio(row, full)))
    for row in sift_rows(rows):
        if row.get("collective_bytes") is not None and row.get("trainable"):
            out.append(_target(limits, scope, "allreduce_bytes",
                               f"{row['label']} bytes all-reduced per step <= {{limit:g}} x 4 B x selected",
                               ratio(reduced_bytes(row), 4 * row["trainable"])))
    for row in state_rows or []:
        if row["method"] == "sift" and row.get("trainable"):
            per_entry = row["state_bytes"] / row["trainable"]
            index = row["index_bytes"] / row["trainable"]
            out.append(_target(limits, scope, "state_bytes",
                               f"{row['label']} trainable state <= {{limit:g}} x (16 B + index B) per entry",
                               ratio(per_entry, 16 + index)))
    for row in sift_rows(rows):
        if row.get("selection_s") is None:
            continue
        out.append(_target(limits, scope, "selection_time", f"{row['label']} selection pass <= {{limit:g}}x one step",
                           selection_ratio(row)))
        if row.get("selection_peak") is not None:
            out.append(_target(limits, scope, "selection_memory",
                               f"{row['label']} selection peak memory <= {{limit:g}}x the training steps' peak",
                               ratio(row["selection_peak"], peak(row))))
    return [target for target in out if target is not None]


def recovery(base_loss: float, sift_loss: float, full_loss: float) -> float | None:
    """Share of full fine-tuning's held-out loss reduction that SIFT achieves (1.0 = all of it)."""
    return ratio(base_loss - sift_loss, base_loss - full_loss) if full_loss < base_loss else None


def quality_targets(quality: dict, match_label: str = "sift-1%", limits: Limits | None = None) -> list[dict]:
    limits = limits or {}
    full = find(quality["rows"], "full")  # the reference: full fine-tuning at its own (paper) rate
    sift = find(quality["rows"], match_label)
    if full is None or sift is None:
        return []
    base = quality["base"]["eval_loss"]
    out = [_target(limits, "quality", "recovery",
                   f"{match_label} recovers >= {{limit:.0%}} of full fine-tuning's held-out loss reduction",
                   recovery(base, sift["eval_loss"], full["eval_loss"]))]
    for other in quality["rows"]:
        if other["method"] == "full" and other is not full:
            out.append(_target(limits, "quality", "recovery",
                               f"{match_label} recovers >= {{limit:.0%}} of {other['label']}'s reduction",
                               recovery(base, sift["eval_loss"], other["eval_loss"])))
    return [target for target in out if target is not None]


def cost_rows_with_state(cost: dict) -> list[dict]:
    """Cost rows with the selection's time and peak folded in, as the target functions read them."""
    device_cuda = cost.get("device_type") == "cuda"
    rows = []
    for row in cost["rows"]:
        row = dict(row)
        if row.get("selection"):
            selection = row["selection"]
            row["selection_s"] = selection["wall_s"]
            if selection.get("round_wall_s"):
                row["round_selection_s"] = selection["round_wall_s"]
            row["selection_peak"] = selection.get("cuda_max_allocated_bytes") if device_cuda else None
            if row["selection_peak"] is None:
                row["selection_peak"] = selection.get("peak_rss_bytes")
        rows.append(row)
    return rows


def evaluate(results: dict, limits: Limits | None = None) -> list[dict]:
    """Every target the bench config sets and the results hold numbers for: CPU cost, quality, GPU layer stack.

    ``limits`` default to the ``targets`` bench.json carries (the bench YAML's, copied at each run).
    """
    limits = results.get("targets") or {} if limits is None else limits
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
        out += cost_targets(cost_rows_with_state(cost), scope, match, state, limits)
    if "quality" in parts:
        out += quality_targets(parts["quality"], limits=limits)
    if "layer_stack" in parts:
        stack = parts["layer_stack"]
        match = f"sift-{stack['lora_match_density'] * 100:g}%"
        rows = []
        for row in stack["rows"]:
            row = dict(row)
            if row.get("selection_peak_bytes") is not None:
                row["selection_peak"] = row["selection_peak_bytes"]
            if row.get("round_selection_s"):
                row["round_selection_s"] = row["round_selection_s"]
            rows.append(row)
        state = [{"label": r["label"], "method": r["method"], "trainable": r["trainable"],
                  "state_bytes": r["state_bytes"], "index_bytes": r["index_bytes"]} for r in sift_rows(rows)]
        out += cost_targets(rows, f"layer stack ({stack['device']})", match, state, limits)
    return out
