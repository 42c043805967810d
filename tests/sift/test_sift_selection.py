"""Selection: every metric and scope picks what a direct dense computation says, and reports it."""

from __future__ import annotations

import math

import pytest
import torch
from sift_test_utils import lm_loss, select, selected_model, tiny_model, token_batches

from sift_llm import schema
from sift_llm.errors import UserError
from sift_llm.sift import SiftConfig, attach_sift, selection
from sift_llm.sift.selection import top_k_positions

DENSITY = 0.05


def dense_scores(config: SiftConfig, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The metric computed the obvious way: full dense gradients of an untouched copy of the model."""
    model = tiny_model()
    model.requires_grad_(False)
    targets = {n: m for n, m in model.named_modules() if n.endswith("_proj")}
    for module in targets.values():
        module.weight.requires_grad_(True)
    scores = {name: torch.zeros_like(m.weight) for name, m in targets.items()}
    for ids in batches:
        model.zero_grad(set_to_none=True)
        lm_loss(model, ids).backward()
        for name, module in targets.items():
            w, g = module.weight.detach(), module.weight.grad
            scores[name] += {
                "grad_abs": g.abs(),
                "grad_abs_sum": g.abs(),
                "fisher": g.square(),
                "snip": (w * g).abs(),
                "weight_abs": w.abs(),
            }[config.metric]
    return {name: score.flatten() for name, score in scores.items()}


def expected_per_matrix(scores: dict[str, torch.Tensor], handle) -> dict[str, torch.Tensor]:
    return {name: torch.topk(s, handle.layers[name].k).indices.sort().values for name, s in scores.items()}


def chosen(handle) -> dict[str, torch.Tensor]:
    return {name: layer.indices.long() for name, layer in handle.layers.items()}


def assert_same_indices(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in actual:
        assert torch.equal(actual[name], expected[name]), name


@pytest.mark.parametrize("metric", ["grad_abs", "grad_abs_sum", "fisher", "snip", "weight_abs"])
def test_single_batch_metric_matches_dense_topk(metric):
    config = SiftConfig(density=DENSITY, metric=metric)
    _, handle, report = selected_model(config)
    assert_same_indices(chosen(handle), expected_per_matrix(dense_scores(config, token_batches(1)), handle))
    assert report.batches == 1


@pytest.mark.parametrize("metric", ["grad_abs_sum", "fisher", "snip"])
def test_accumulated_metric_with_covering_pool_equals_dense_accumulation(metric):
    # pool_factor * k >= entries of every matrix: the pool holds the whole matrix and the sum is exact.
    config = SiftConfig(density=DENSITY, metric=metric, calibration_batches=3, pool_factor=1 / DENSITY + 1)
    _, handle, report = selected_model(config, batches=3)
    assert_same_indices(chosen(handle), expected_per_matrix(dense_scores(config, token_batches(3)), handle))
    assert report.batches == 3


def test_accumulated_metric_with_small_pool_stays_inside_first_batch_candidates():
    config = SiftConfig(density=DENSITY, metric="grad_abs_sum", calibration_batches=3, pool_factor=2.0)
    _, handle, _ = selected_model(config, batches=3)
    first = dense_scores(SiftConfig(metric="grad_abs"), token_batches(1))
    for name, indices in chosen(handle).items():
        layer = handle.layers[name]
        pool = torch.topk(first[name], math.ceil(2.0 * layer.k)).indices
        assert indices.numel() == layer.k
        assert torch.isin(indices, pool).all(), name


def assert_global_topk(config: SiftConfig, batches: int) -> None:
    _, handle, report = selected_model(config, batches=batches)
    scores = dense_scores(config, token_batches(batches))
    names = list(handle.layers)
    flat = torch.cat([scores[n] for n in names])
    budget = round(config.density * flat.numel())
    top = torch.topk(flat, budget).indices.sort().values
    offsets = torch.tensor([0] + [scores[n].numel() for n in names]).cumsum(0)
    expected = {n: top[(top >= offsets[i]) & (top < offsets[i + 1])] - offsets[i] for i, n in enumerate(names)}
    assert_same_indices(chosen(handle), expected)
    assert report.selected == budget
    assert sorted(handle.trainable_parameters(), key=id) == sorted(
        [layer.values for layer in handle.layers.values() if layer.k], key=id
    )


@pytest.mark.parametrize("batches", [1, 3])
def test_global_scope_picks_global_topk(batches):
    metric = "grad_abs" if batches == 1 else "fisher"
    assert_global_topk(SiftConfig(density=DENSITY, metric=metric, scope="global", calibration_batches=batches,
                                  pool_factor=50), batches)


def test_global_pool_pruned_by_a_sampled_floor_still_ends_in_the_exact_topk(monkeypatch):
    # At 30% the pool fills while the backward pass is still streaming, and is large enough for the sampled
    # floor (not the exact cut) to prune it; the final selection must not change.
    accepted = []
    real = selection._sampled_floor

    def spy(scores, k):
        floor = real(scores, k)
        accepted.append(floor is not None and k <= int((scores >= floor).sum()) <= k + k // 4 + 1024)
        return floor

    monkeypatch.setattr(selection, "_sampled_floor", spy)
    assert_global_topk(SiftConfig(density=0.3, metric="grad_abs", scope="global"), 1)
    assert any(accepted)


def test_random_metric_is_seeded_and_sized():
    def run(seed):
        return chosen(selected_model(SiftConfig(density=DENSITY, metric="random", seed=seed))[1])

    first, again, other = run(0), run(0), run(1)
    assert_same_indices(first, again)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_top_k_positions_breaks_ties_by_position():
    scores = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 3.0])
    assert top_k_positions(scores, 2).tolist() == [1, 2]
    assert top_k_positions(scores, 5).tolist() == [0, 1, 2, 3, 5]
    assert top_k_positions(scores, 9).tolist() == list(range(6))
    assert top_k_positions(scores, 0).tolist() == []


def test_report_counts_shares_and_timing():
    _, handle, report = selected_model(SiftConfig(density=DENSITY))
    assert len(report.matrices) == len(handle.layers) == 14
    assert report.selected == sum(layer.k for layer in handle.layers.values())
    assert report.entries == sum(layer.numel_weight for layer in handle.layers.values())
    assert report.calibration_seconds >= report.finalize_seconds >= 0

    grad = dense_scores(SiftConfig(metric="grad_abs"), token_batches(1))  # |g|
    row = report.matrices[0]
    top = torch.topk(grad[row.name], row.selected).values
    assert row.score_share == pytest.approx(float(top.sum() / grad[row.name].sum()), rel=1e-5)
    assert row.grad_sq_share == pytest.approx(float(top.square().sum() / grad[row.name].square().sum()), rel=1e-5)
    assert report.to_dict()["matrices"][0]["name"] == row.name
    assert "SIFT selection" in report.summary()


@pytest.mark.parametrize("scope", ["per_matrix", "global"])
def test_budget_is_an_exact_total(scope):
    _, handle, report = selected_model(SiftConfig(budget=500, scope=scope))
    assert report.selected == 500 == sum(layer.k for layer in handle.layers.values())


def test_calibration_leaves_no_gradient_and_restores_trainability():
    model = tiny_model()
    handle = attach_sift(model, SiftConfig(density=DENSITY, dense_modules=["lm_head"]))
    select(handle, token_batches(1))
    assert all(p.grad is None for p in model.parameters())
    assert model.lm_head.weight.requires_grad
    assert all(layer.values.requires_grad for layer in handle.layers.values())


def test_no_matching_module_lists_the_available_ones():
    with pytest.raises(UserError, match=r"no nn.Linear module matches.*q_proj \(x2\).*lm_head"):
        attach_sift(tiny_model(), SiftConfig(targets=["fc_in", "fc_out"]))


def test_regex_targets_and_dense_overlap():
    handle = attach_sift(tiny_model(), SiftConfig(targets=[r"model\.layers\.1\..*_proj"]))
    assert len(handle.layers) == 7 and all(".layers.1." in n for n in handle.layers)
    with pytest.raises(UserError, match="both dense"):
        attach_sift(tiny_model(), SiftConfig(dense_modules=["mlp"]))


def test_calibration_misuse_is_refused():
    model = tiny_model()
    handle = attach_sift(model, SiftConfig(density=DENSITY))
    selector = handle.selector()
    with pytest.raises(UserError, match="no calibration batch"):
        selector.finalize()
    with pytest.raises(UserError, match="more calibration batches"), selector.calibrating():
        for ids in token_batches(2):
            lm_loss(model, ids).backward()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"density": 0}, "out of range"),
        ({"metric": "grad_abs", "calibration_batches": 2}, "single batch"),
        ({"targets": ["q_proj("]}, "regular expression"),
        ({"metric": "gradabs"}, "did you mean"),
        ({"budget": 0}, "out of range"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(schema.ConfigError, match=message):
        schema.build(SiftConfig, raw, "sift")
