"""Reports that show what tuning changed: the held-out likelihood first, paired deltas marked against
noise, the sample-size line, generation samples side by side, delta charts and per-run training curves."""

from __future__ import annotations

import json
import math
import struct

import pytest
from eval_helpers import MMLU_TREE, fake_results, mmlu_scores, with_heldout, with_per_doc_acc, write_evaluated_run

from sift_llm.evaluation import report
from sift_llm.evaluation import results as results_io

BASE_DOCS = [(-30.0, 10), (-45.0, 15), (-20.0, 8), (-60.0, 20), (-33.0, 12)]
TUNED_DOCS = [(-27.0, 10), (-41.0, 15), (-18.5, 8), (-55.0, 20), (-30.5, 12)]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def _write(run, name, payload):
    (run / "eval" / name / "results.json").write_text(json.dumps(payload))


def _heldout_run(tmp_path, name="run", method="sift", tuned_docs=TUNED_DOCS, generations=True):
    run = write_evaluated_run(tmp_path / name, method, shift=0.0)
    base = fake_results(mmlu_scores(), MMLU_TREE, fingerprint="fp-base", cached=True)
    tuned = fake_results(mmlu_scores(), MMLU_TREE, adapter="a", adapter_kind=method)
    gens = [("Give three tips.", "base says hi"), ("Name a colour | or two.", "red\nblue")]
    _write(run, "base", with_heldout(base, BASE_DOCS, gens if generations else None))
    _write(run, "tuned", with_heldout(tuned, tuned_docs, [(i, f"{method} answer {k}<b>") for k, (i, _) in
                                                         enumerate(gens)] if generations else None))
    return run


def test_paired_nll_delta_and_its_standard_error():
    base = with_heldout(fake_results({}, {}), BASE_DOCS)
    tuned = with_heldout(fake_results({}, {}), TUNED_DOCS)
    d = results_io.delta(tuned, base, "heldout_likelihood", "nll")
    tokens = sum(n for _, n in BASE_DOCS)
    assert d.value == pytest.approx((sum(-ll for ll, _ in TUNED_DOCS) - sum(-ll for ll, _ in BASE_DOCS)) / tokens)
    # ratio estimator by hand: u_i = per-doc NLL-sum change, se = sqrt(sum((u - d n)^2) / (N (N-1))) / mean(n)
    u = [(-t) - (-b) for (t, _), (b, _) in zip(TUNED_DOCS, BASE_DOCS)]
    n = [c for _, c in BASE_DOCS]
    expected = math.sqrt(sum((a - d.value * c) ** 2 for a, c in zip(u, n)) / (5 * 4)) / (sum(n) / 5)
    assert d.paired and d.stderr == pytest.approx(expected)
    # the paired error is far below the two columns' errors combined (the same responses, both models)
    unpaired = math.hypot(results_io.score(tuned, "heldout_likelihood").stderr,
                          results_io.score(base, "heldout_likelihood").stderr)
    assert d.stderr < unpaired / 2 and d.within_noise is False


def test_paired_accuracy_delta_over_a_groups_questions():
    base = with_per_doc_acc(fake_results(mmlu_scores(), MMLU_TREE),
                            {"mmlu_offline_anatomy": [1, 0, 0, 1], "mmlu_offline_virology": [0, 0],
                             "mmlu_offline_philosophy": [1, 1, 0]})
    tuned = with_per_doc_acc(fake_results(mmlu_scores(0.1), MMLU_TREE),
                             {"mmlu_offline_anatomy": [1, 1, 0, 1], "mmlu_offline_virology": [0, 1],
                              "mmlu_offline_philosophy": [1, 1, 0]})
    d = results_io.delta(tuned, base, "mmlu_offline_stem")
    diffs = [0, 1, 0, 0, 0, 1]  # anatomy then virology: two questions flipped to right
    mean = sum(diffs) / 6
    assert d.paired and d.n == 6
    assert d.stderr == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in diffs) / 5 / 6))
    assert d.value == pytest.approx(0.1)  # the value is still the scores' difference
    # a leaf without records: the group falls back to the two stderrs as if independent
    del tuned["sift_llm"]["per_doc"]["mmlu_offline_virology"]
    d = results_io.delta(tuned, base, "mmlu_offline_stem")
    assert not d.paired and d.stderr == pytest.approx(math.hypot(0.03, 0.03))
    assert results_io.Delta(0.0, 0.0, True).within_noise is True
    assert results_io.Delta(0.01, 0.0, True).within_noise is False
    assert results_io.Delta(0.01, None, False).within_noise is None


def test_run_report_leads_with_the_heldout_likelihood_and_marks_noise(tmp_path):
    run = _heldout_run(tmp_path)
    text = report.write_run_report(run).read_text()
    assert text.index("## Held-out response likelihood") < text.index("![accuracy per category]") \
        < text.index("## Benchmarks") < text.index("## Samples") < text.index("## Training")
    base_nll = sum(-ll for ll, _ in BASE_DOCS) / 65
    tuned_nll = sum(-ll for ll, _ in TUNED_DOCS) / 65
    first_row = next(line for line in text.splitlines() if line.startswith("| **NLL per token**"))
    assert first_row.startswith(f"| **NLL per token** | 5 | {base_nll:.4f} ± ")
    assert f"| {tuned_nll - base_nll:+.4f} | ±" in first_row and "**beyond noise**" in first_row
    assert "(65 response tokens)" in text
    # MMLU unchanged: every delta is zero and says so; the sample-size line gives the resolution
    assert "| **mmlu_offline (overall)** | 300 | 30.00 ± 2.00 | 30.00 ± 2.00 | +0.00 | no change |" in text
    assert ("- **Sample size:** 300 questions can show an overall accuracy change larger than about ±5.7 pp "
            "(2 standard errors of Δ); they cannot show a smaller one, nor a change within one category "
            "(about ±8.5 to ±14.1 pp at 100-200 questions each).") in text
    summary = json.loads((run / "eval_summary.json").read_text())
    first = summary["rows"][0]
    assert first["task"] == "heldout_likelihood" and first["within_noise"]["sift"] is False
    assert first["delta"]["sift"] == pytest.approx(tuned_nll - base_nll)
    assert summary["rows"][1]["within_noise"]["sift"] is True


def test_a_small_change_is_within_noise(tmp_path):
    nudged = [(ll + (0.3 if i % 2 else -0.3), n) for i, (ll, n) in enumerate(BASE_DOCS)]
    run = _heldout_run(tmp_path, tuned_docs=nudged)
    text = report.write_run_report(run).read_text()
    first_row = next(line for line in text.splitlines() if line.startswith("| **NLL per token**"))
    assert "within noise" in first_row and "beyond" not in first_row


def test_samples_side_by_side_in_markdown_and_json(tmp_path):
    run = _heldout_run(tmp_path)
    text = report.write_run_report(run).read_text()
    assert "Greedy responses to the first 2 held-out instructions (at most 32 new tokens, stopping at EOS)" in text
    assert "**1. Give three tips.**" in text and "| base | sift |" in text
    assert "| base says hi | sift answer 0&lt;b&gt; |" in text  # HTML-escaped, one row
    assert "| red<br>blue | sift answer 1&lt;b&gt; |" in text  # newlines kept as <br>
    assert "Name a colour &#124; or two." not in text and "**2. Name a colour | or two.**" in text
    samples = json.loads((run / "samples.json").read_text())["samples"]
    assert [s["instruction"] for s in samples] == ["Give three tips.", "Name a colour | or two."]
    assert samples[1]["responses"] == {"base": "red\nblue", "sift": "sift answer 1<b>"}
    assert samples[0]["reference"] == "ref 0"
    # a report without samples removes a stale samples.json
    run2 = _heldout_run(tmp_path, "run2", generations=False)
    (run2 / "samples.json").write_text("stale")
    assert "## Samples" not in report.write_run_report(run2).read_text()
    assert not (run2 / "samples.json").exists()


def test_instruction_text_of_alpaca_and_other_prompts():
    prompt = "Below.\n\n### Instruction:\nDo it.\n\n### Input:\nthis\n\n### Response:"
    assert report.instruction_text(prompt) == "Do it.\n\nInput: this"
    assert report.instruction_text("<|im_start|>user\nhi<|im_end|>\n") == "<|im_start|>user\nhi<|im_end|>"


def test_comparison_charts_have_a_panel_per_run_and_delta_bars(tmp_path):
    one = report.write_run_report(_heldout_run(tmp_path, "one"))
    runs = [_heldout_run(tmp_path, name, method) for name, method in (("a", "sift"), ("b", "lora"), ("c", "full"))]
    out = report.compare_runs(runs, tmp_path / "cmp")
    text = out.read_text()
    assert "| Held-out responses | N | base | sift | lora | full | Δ sift | Δ lora | Δ full |" in text
    assert text.count("**beyond noise**") >= 3
    curves_one, curves_three = _png_size(one.parent / "training_curves.png"), _png_size(tmp_path / "cmp" / "training_curves.png")
    assert curves_three[0] > 1.5 * curves_one[0]  # one panel per run, side by side
    chart_one, chart_three = _png_size(one.parent / "eval_accuracy.png"), _png_size(tmp_path / "cmp" / "eval_accuracy.png")
    assert chart_one[0] > 600 and chart_three[0] >= chart_one[0]
    samples = json.loads((tmp_path / "cmp" / "samples.json").read_text())["samples"]
    assert set(samples[0]["responses"]) == {"base", "sift", "lora", "full"}


def test_report_without_a_base_draws_scores_not_deltas(tmp_path):
    results = fake_results(mmlu_scores(), MMLU_TREE)
    path = report.write_report([report.Column("model", results)], tmp_path, title="plain")
    text = path.read_text()
    assert "Δ" not in text and "## Held-out response likelihood" not in text
    assert _png_size(tmp_path / "eval_accuracy.png")[0] > 600


def test_identical_answers_state_the_resolution_of_the_scores(tmp_path):
    """Paired records with no question changed have a paired error of 0: the sample-size line then falls back
    to the two scores' standard errors instead of claiming any change would show."""
    run = write_evaluated_run(tmp_path / "run", "sift", shift=0.0)
    answers = {"mmlu_offline_anatomy": [1, 0, 0, 1], "mmlu_offline_virology": [0, 0], "mmlu_offline_philosophy": [1]}
    for name in ("base", "tuned"):
        path = run / "eval" / name / "results.json"
        path.write_text(json.dumps(with_per_doc_acc(json.loads(path.read_text()), answers)))
    text = report.write_run_report(run).read_text()
    assert "| **mmlu_offline (overall)** | 300 | 30.00 ± 2.00 | 30.00 ± 2.00 | +0.00 | no change |" in text
    assert "larger than about ±5.7 pp" in text
    assert "Standard error of Δ: paired over the same questions" in text


def test_the_runs_config_is_read_by_the_experiment_config_loader(tmp_path, capsys):
    from sift_llm.cli import main

    run = write_evaluated_run(tmp_path / "run", "lora", shift=0.0)
    assert main(["report", str(run)]) == 0
    assert "# lora vs base: run" in (run / "report.md").read_text()
    (run / "config.yaml").write_text("method: {name: lora, lora: {rank: 4}}\n")
    assert main(["report", str(run)]) == 2
    assert "config.yaml: unknown key 'method.lora.rank'" in capsys.readouterr().err
