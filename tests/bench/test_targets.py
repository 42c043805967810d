"""The ratio and target logic, on synthetic numbers."""

from __future__ import annotations

import pytest

from sift_llm.bench.common import lora_count, matching_lora_rank, sift_count
from sift_llm.bench.config import load_bench_config
from sift_llm.bench.targets import cost_targets, evaluate, quality_targets, recovery, reduced_bytes

GIB = 2**30
# The limits live in the bench YAML, not in the library.
LIMITS = load_bench_config("benchmarks/cpu.yaml").targets


def row(label, method, *, peak, step, trainable=None, reduced=None, **extra):
    out = {"label": label, "method": method, "peak_rss_bytes": peak, "step_time_s": step, "trainable": trainable}
    if reduced is not None:
        out["collective_bytes"] = {"all_reduce": reduced, "all_gather_into_tensor": reduced}
    return {**out, **extra}


def by_name(targets, name, label=""):
    return [t for t in targets if t["name"] == name and label in t["target"]]


def test_cost_targets_compute_ratios_against_lora_and_full():
    rows = [
        row("sift-1%", "sift", peak=2.2 * GIB, step=1.0, trainable=1000, reduced=4004, selection_s=1.5),
        row("sift-5%", "sift", peak=2.6 * GIB, step=1.3, trainable=5000, reduced=24000),
        row("sift-1% (before)", "sift", peak=2.3 * GIB, step=1.6, trainable=1000, before=True),
        row("lora-r4", "lora", peak=2.0 * GIB, step=1.0),
        row("full", "full", peak=8.0 * GIB, step=1.25),
    ]
    state = [{"label": "sift-1%", "method": "sift", "trainable": 1000, "state_bytes": 20_000, "index_bytes": 4000}]
    targets = cost_targets(rows, "cpu", "sift-1%", state, LIMITS)

    (memory_lora,) = by_name(targets, "memory_vs_lora")
    assert memory_lora["measured"] == pytest.approx(1.1) and memory_lora["met"] is True  # the limit is inclusive
    (memory_full,) = by_name(targets, "memory_vs_full")
    assert memory_full["measured"] == pytest.approx(0.275) and memory_full["met"]
    # one step-time pair per current-kernel SIFT row; the before-kernels row is no target
    assert [t["target"].split()[0] for t in by_name(targets, "step_vs_lora")] == ["sift-1%", "sift-5%"]
    assert by_name(targets, "step_vs_lora", "sift-5%")[0]["met"] is False  # 1.3 > 1.15
    assert by_name(targets, "step_vs_full", "sift-5%")[0]["measured"] == pytest.approx(1.04)
    assert by_name(targets, "step_vs_full", "sift-5%")[0]["met"] is False
    assert by_name(targets, "allreduce_bytes", "sift-1%")[0]["measured"] == pytest.approx(1.001)
    assert by_name(targets, "allreduce_bytes", "sift-5%")[0]["met"] is False  # 24000 / 20000 = 1.2
    (state_target,) = by_name(targets, "state_bytes")
    assert state_target["measured"] == pytest.approx(20 / 20) and state_target["met"]
    (selection,) = by_name(targets, "selection_time")
    assert selection["measured"] == pytest.approx(1.5) and selection["met"]


def test_missing_baselines_give_unmeasured_targets():
    targets = cost_targets([row("sift-1%", "sift", peak=1.0, step=1.0, trainable=10)], "cpu", "sift-1%", limits=LIMITS)
    assert {t["name"] for t in targets} >= {"memory_vs_lora", "memory_vs_full", "step_vs_lora"}
    assert all(t["met"] is None for t in targets if t["name"] != "allreduce_bytes")


def test_recovery_share_and_quality_target():
    assert recovery(2.0, 1.8, 1.6) == pytest.approx(0.5)
    assert recovery(2.0, 1.5, 1.6) == pytest.approx(1.25)  # SIFT may beat full fine-tuning
    assert recovery(2.0, 1.9, 2.1) is None  # full fine-tuning did not lower the loss: no share
    quality = {"base": {"eval_loss": 2.0}, "rows": [
        {"label": "sift-1%", "method": "sift", "eval_loss": 1.62},
        {"label": "full", "method": "full", "eval_loss": 1.6},
    ]}
    (target,) = quality_targets(quality, limits=LIMITS)
    assert target["measured"] == pytest.approx(0.95) and target["met"] and not target["at_most"]


def test_reduced_bytes_counts_reductions_not_gathers():
    counts = {"all_reduce": 100, "reduce_scatter_tensor": 50, "all_gather_into_tensor": 999, "broadcast": 7}
    assert reduced_bytes({"collective_bytes": counts}) == 150
    assert reduced_bytes({}) is None


def test_lora_rank_matches_sift_count():
    shapes = [(1024, 1024)] * 4 + [(2816, 1024)] * 2 + [(1024, 2816)]
    k = sift_count(shapes, 0.01)
    r = matching_lora_rank(shapes, 0.01)
    assert abs(lora_count(shapes, r) - k) <= lora_count(shapes, 1) / 2
    assert matching_lora_rank(shapes, 1e-6) == 1


def test_evaluate_reads_every_part():
    results = {"targets": LIMITS, "parts": {
        "cost": {"config": {"lora_match_density": 0.01}, "device_type": "cpu", "ranks": 2, "rows": [
            row("sift-1%", "sift", peak=3.0, step=1.0, trainable=10, reduced=40, selection={"wall_s": 3.0}),
            row("lora-r1", "lora", peak=3.0, step=1.0), row("full", "full", peak=9.0, step=2.0)]},
        "layer_stack": {"device": "GPU", "lora_match_density": 0.01, "rows": [
            {"label": "sift-1%", "method": "sift", "peak_bytes": 4, "step_time_s": 1.0, "trainable": 10,
             "state_bytes": 160, "index_bytes": 40, "selection_s": 1.0},
            {"label": "lora-r1", "method": "lora", "peak_bytes": 4, "step_time_s": 1.0, "trainable": 10},
            {"label": "full", "method": "full", "peak_bytes": 16, "step_time_s": 1.0, "trainable": 100}]},
    }}
    targets = evaluate(results)
    scopes = {t["scope"] for t in targets}
    assert scopes == {"cost (cpu, 2 ranks)", "layer stack (GPU)"}
    cpu_selection = [t for t in targets if t["name"] == "selection_time" and t["scope"].startswith("cost")]
    assert cpu_selection[0]["measured"] == pytest.approx(3.0) and cpu_selection[0]["met"] is False


def test_step_ratio_pairs_rounds():
    from sift_llm.bench.targets import step_ratio

    # Round 1 ran under load, round 2 on a quiet machine: per-round ratios agree, pooled medians would not.
    sift = {"step_time_s": 2.9, "round_step_time_s": [4.0, 2.0]}
    lora = {"step_time_s": 1.8, "round_step_time_s": [3.6, 1.8]}
    assert step_ratio(sift, lora) == pytest.approx((4.0 / 3.6 + 2.0 / 1.8) / 2)
    three = {"round_step_time_s": [1.0, 1.2, 9.0]}
    base = {"round_step_time_s": [1.0, 1.0, 1.0]}
    assert step_ratio(three, base) == pytest.approx(1.2)  # the middle round's ratio
    assert step_ratio({"step_time_s": 2.0}, {"step_time_s": 1.0, "round_step_time_s": [1.0]}) == 2.0
    assert step_ratio(sift, None) is None


def test_quality_targets_also_against_extra_full_rows():
    quality = {"base": {"eval_loss": 2.0}, "rows": [
        {"label": "sift-1%", "method": "sift", "eval_loss": 1.7},
        {"label": "full", "method": "full", "eval_loss": 1.7},
        {"label": "full (lr 0.0002)", "method": "full", "eval_loss": 1.5},
    ]}
    reference, other = quality_targets(quality, limits=LIMITS)
    assert reference["measured"] == pytest.approx(1.0) and reference["met"]
    assert "full (lr 0.0002)" in other["target"] and other["measured"] == pytest.approx(0.6) and not other["met"]
