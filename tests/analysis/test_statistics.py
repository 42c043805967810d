"""The analysis statistics against a direct computation from dense gradients taken independently."""

from __future__ import annotations

import copy

import pytest
import torch

import tiny
from sift_llm.analysis.config import AnalysisConfig
from sift_llm.analysis.gradients import gradient_statistics
from sift_llm.analysis.stats import MatrixTracker
from sift_llm.sift.config import density_count as top_count
from sift_llm.analysis.summarize import share_label, summarize_model
from sift_llm.runtime import default_device
from sift_llm.sift import attach_sift
from sift_llm.sift.config import SiftConfig
from sift_llm.sift.model import find_targets

VOCAB = 96
SHARES = [0.001, 0.01, 0.05, 0.1, 0.5, 1.0]  # 1.0: batch 1's set is searched up to the whole matrix
BATCHES = 3
approx = lambda value: pytest.approx(value, rel=1e-9, abs=1e-12)  # noqa: E731


def make_batches(count: int, size: int = 2, seq: int = 16, seed: int = 1) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (size, seq), generator=generator)
        labels = ids.clone()
        labels[:, :4] = -100  # a masked prompt
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def direct_grads(model, names: list[str], batch: dict) -> dict[str, torch.Tensor]:
    """Dense weight gradients by torch.autograd.grad, independently of the analysis's hooks."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight for name in names]
    loss = model(**batch).loss
    return {name: g.reshape(-1).double() for name, g in zip(names, torch.autograd.grad(loss, weights))}


def ranking(g: torch.Tensor) -> list[int]:
    """Positions by |g| descending, ties to the lower position (SIFT's rule), by plain Python sorting."""
    values = g.abs().tolist()
    return sorted(range(len(values)), key=lambda i: (-values[i], i))


def top_mass(g: torch.Tensor, k: int) -> float:
    return float(g.square()[ranking(g)[:k]].sum())


@pytest.fixture(scope="module")
def measured():
    model = tiny.build_model(VOCAB, layers=2, hidden=32, seed=3)
    batches = make_batches(BATCHES)
    acfg = AnalysisConfig(batches=BATCHES, shares=SHARES, coverage_share=0.05, keep=0.9)
    targets = find_targets(model, SiftConfig())
    stats = gradient_statistics(model, targets, batches, acfg, label="pretrained")
    result = summarize_model(stats, acfg)
    grads = [direct_grads(model, list(targets), batch) for batch in batches]
    return {"model": model, "targets": targets, "acfg": acfg, "stats": stats, "result": result,
            "grads": grads, "batches": batches}


def test_definitions_on_a_hand_made_gradient():
    grad = torch.tensor([[3.0, -4.0], [0.0, 1.0], [-4.0, 0.5]])  # sum g^2 = 42.25, sum |g| = 12.5
    tracker = MatrixTracker("m", (3, 2), shares=[1 / 6, 0.5], coverage_share=1 / 6, cover_max=0.5, keep=0.9,
                            grid=[1 / 6, 0.5, 1.0])
    record = tracker.observe(grad)
    assert record.norm_sq == approx(42.25)
    assert record.top_sq == approx([16.0, 41.0])  # top 1: one -4 (the lower position, 1); top 3: 4, 4, 3
    assert record.top_l1 == approx([4.0, 11.0])
    assert tracker.top_sets[0].tolist() == [1]  # tie between positions 1 and 4 goes to the lower
    assert record.min_density == approx(3 / 6)  # 41 / 42.25 = 0.970 >= 0.9; 32 / 42.25 < 0.9
    later = tracker.observe(torch.tensor([[0.0, 1.0], [2.0, 0.0], [3.0, 0.0]]))
    assert later.cover_first_sq == approx(1.0) and later.cover_own_sq == approx(9.0)
    assert later.first_grid_sq == approx([1.0, 10.0])  # batch 1's top 1 = {1}, top 3 = {1, 4, 0}
    assert tracker.overlap(0, 1) == 0


def test_model_state_is_restored(measured):
    for param in measured["model"].parameters():
        assert param.requires_grad and param.grad is None


def test_shares_match_direct_computation(measured):
    rows = {row["name"]: row for row in measured["result"]["matrices"]}
    overall = measured["result"]["overall"]["top_share"]
    assert set(rows) == set(measured["targets"]) and len(rows) == 14
    for share in SHARES:
        label = share_label(share)
        l1_shares: dict[str, list[float]] = {}
        for b, grads in enumerate(measured["grads"]):
            kept = total = 0.0
            for name, g in grads.items():
                k = top_count(share, g.numel())
                mass = top_mass(g, k)
                assert rows[name]["top_share_per_batch"][label][b] == approx(mass / float(g.square().sum()))
                l1_shares.setdefault(name, []).append(float(g.abs()[ranking(g)[:k]].sum() / g.abs().sum()))
                kept, total = kept + mass, total + float(g.square().sum())
            assert overall[label]["pooled_per_batch"][b] == approx(kept / total)
        for name in rows:
            per_batch = rows[name]["top_share_per_batch"][label]
            assert rows[name]["top_share"][label] == approx(sum(per_batch) / BATCHES)
            assert rows[name]["top_l1_share"][label] == approx(sum(l1_shares[name]) / BATCHES)


def test_coverage_and_overlap_match_direct_computation(measured):
    rows = {row["name"]: row for row in measured["result"]["matrices"]}
    coverage = measured["result"]["coverage"]
    first = {name: ranking(g) for name, g in measured["grads"][0].items()}
    sets = [{name: set(ranking(g)[: top_count(0.05, g.numel())]) for name, g in grads.items()}
            for grads in measured["grads"]]
    for b, grads in enumerate(measured["grads"]):
        first_mass = own_mass = total = shared = size = 0.0
        for name, g in grads.items():
            k = top_count(0.05, g.numel())
            squared = g.square()
            covered = float(squared[first[name][:k]].sum())
            own = top_mass(g, k)
            assert rows[name]["coverage"]["first_batch"][b] == approx(covered / float(squared.sum()))
            assert rows[name]["coverage"]["own_top"][b] == approx(own / float(squared.sum()))
            assert rows[name]["coverage"]["overlap_with_first"][b] == approx(len(sets[0][name] & sets[b][name]) / k)
            assert covered <= own * (1 + 1e-12)  # no set of k entries beats the own top k
            first_mass, own_mass, total = first_mass + covered, own_mass + own, total + float(squared.sum())
            shared, size = shared + len(sets[0][name] & sets[b][name]), size + k
        row = coverage["per_batch"][b]
        assert row["first_batch_top"] == approx(first_mass / total)
        assert row["own_top"] == approx(own_mass / total)
        assert row["overlap_with_first"] == approx(shared / size)
        for a in range(BATCHES):
            expected = sum(len(sets[a][n] & sets[b][n]) for n in rows) / size
            assert coverage["overlap_matrix"][a][b] == approx(expected)
    assert coverage["per_batch"][0]["first_batch_top"] == coverage["per_batch"][0]["own_top"]
    assert coverage["overlap_matrix"][0][0] == 1.0


def test_minimal_density_per_matrix_is_exact(measured):
    keep = measured["acfg"].keep
    for tracker in measured["stats"].trackers:
        for b, record in enumerate(tracker.records):
            g = measured["grads"][b][tracker.name]
            k = round(record.min_density * g.numel())
            total = float(g.square().sum())
            assert top_mass(g, k) >= keep * total
            assert k == 1 or top_mass(g, k - 1) < keep * total


def test_suggested_density_keeps_the_asked_share(measured):
    density = measured["result"]["density"]
    keep = measured["acfg"].keep
    grid = density["grid"]

    def pooled(d: float, batches, fixed: bool) -> float:
        shares = []
        for b in batches:
            kept = total = 0.0
            for name, g in measured["grads"][b].items():
                k = top_count(d, g.numel())
                order = ranking(measured["grads"][0][name]) if fixed else ranking(g)
                kept += float(g.square()[order[:k]].sum())
                total += float(g.square().sum())
            shares.append(kept / total)
        return sum(shares) / len(shares)

    suggested = density["suggested"]
    assert suggested is not None
    assert pooled(suggested, range(BATCHES), fixed=False) >= keep * (1 - 1e-12)
    assert pooled(suggested, range(BATCHES), fixed=False) == approx(density["kept_at_suggested"])
    below = grid[grid.index(suggested) - 1]
    assert pooled(below, range(BATCHES), fixed=False) < keep  # smallest on the grid
    fixed = density["suggested_first_batch"]
    assert fixed is not None and fixed >= suggested
    assert pooled(fixed, range(1, BATCHES), fixed=True) >= keep * (1 - 1e-12)
    assert pooled(grid[grid.index(fixed) - 1], range(1, BATCHES), fixed=True) < keep
    spread = density["per_matrix"]
    assert spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"] <= 1.0


def test_first_batch_top_set_is_what_sift_selects(measured):
    """Batch 1's top set (at coverage_share) is SIFT's own grad_abs selection at the same density."""
    model = copy.deepcopy(measured["model"])
    handle = attach_sift(model, SiftConfig(density=0.05))
    selector = handle.selector()
    with selector.calibrating():
        model(**measured["batches"][0]).loss.backward()
    selector.finalize()
    agree = size = 0
    for tracker in measured["stats"].trackers:
        mine = set(tracker.top_sets[0].tolist())
        sift = set(handle.layers[tracker.name].indices.tolist())
        assert len(mine) == len(sift)
        agree, size = agree + len(mine & sift), size + len(mine)
    assert agree / size >= 0.99  # equal up to float near-ties (SIFT sums its gradient per row block)


def test_breakdown_fractions(measured):
    breakdown = measured["result"]["breakdown"]
    for key in ("layers", "module_types"):
        rows = breakdown[key]
        assert sum(r["grad_norm_fraction"] for r in rows) == pytest.approx(1.0)
        assert sum(r["param_fraction"] for r in rows) == pytest.approx(1.0)
    assert [r["group"] for r in breakdown["layers"]] == [0, 1]
    assert {r["group"] for r in breakdown["module_types"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Layer 0's norm^2 fraction, directly.
    fractions = []
    for grads in measured["grads"]:
        total = sum(float(g.square().sum()) for g in grads.values())
        fractions.append(sum(float(g.square().sum()) for n, g in grads.items() if ".layers.0." in n) / total)
    assert breakdown["layers"][0]["grad_norm_fraction"] == approx(sum(fractions) / len(fractions))


def test_one_dense_gradient_at_a_time(monkeypatch):
    """Each matrix's gradient is folded and dropped as backward produces it: never a full set of gradients."""
    model = tiny.build_model(VOCAB, layers=2, hidden=32, seed=4)
    targets = find_targets(model, SiftConfig())
    weights = [module.weight for module in targets.values()]
    live = []
    observe = MatrixTracker.observe

    def spy(self, grad):
        live.append(sum(w.grad is not None for w in weights))
        return observe(self, grad)

    monkeypatch.setattr(MatrixTracker, "observe", spy)
    gradient_statistics(model, targets, make_batches(2), AnalysisConfig(batches=2), label="pretrained")
    assert len(live) == 2 * len(weights) and max(live) == 1


@pytest.mark.skipif(default_device().type == "cpu", reason="needs an accelerator")
def test_accelerator_matches_cpu():
    """On a GPU the statistics (device-side sort, ranking and gather) equal the CPU path's."""
    device = default_device()
    acfg = AnalysisConfig(batches=BATCHES, shares=SHARES, coverage_share=0.05)
    batches = make_batches(BATCHES)
    cpu = tiny.build_model(VOCAB, layers=2, hidden=32, seed=3)
    gpu = copy.deepcopy(cpu).to(device)
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_cpu = summarize_model(gradient_statistics(cpu, find_targets(cpu, SiftConfig()), batches, acfg, label="cpu"),
                                 acfg)
        stats = gradient_statistics(gpu, find_targets(gpu, SiftConfig()), batches, acfg, label="gpu", device=device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    assert stats.trackers[0].first_order.device.type == device.type
    on_gpu = summarize_model(stats, acfg)
    for a, b in zip(on_cpu["matrices"], on_gpu["matrices"]):
        for label in a["top_share"]:
            assert b["top_share"][label] == pytest.approx(a["top_share"][label], rel=1e-4, abs=1e-6)
        for key in ("own_top", "first_batch"):
            assert b["coverage"][key] == pytest.approx(a["coverage"][key], rel=1e-4, abs=1e-6)
        # Same sets up to float near-ties (GPU kernels sum in another order).
        assert b["coverage"]["overlap_with_first"] == pytest.approx(a["coverage"]["overlap_with_first"], abs=0.05)
    assert on_gpu["density"]["suggested"] == pytest.approx(on_cpu["density"]["suggested"], rel=0.05)
