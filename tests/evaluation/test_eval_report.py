"""Reports: table contents, charts, training curves, multi-run comparison, and clear errors."""

from __future__ import annotations

import json

import pytest
from eval_helpers import MMLU_TREE, fake_results, mmlu_scores, write_evaluated_run

from sift_llm.cli import main
from sift_llm.errors import UserError
from sift_llm.evaluation import report
from sift_llm.evaluation import results as results_io

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_layout_puts_categories_in_the_summary_and_subjects_in_details():
    results = fake_results(mmlu_scores(), MMLU_TREE)
    results["results"]["tiny_mc"] = {"acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 10}
    summary, details = results_io.layout(results)
    assert [(r.name, r.label, r.level) for r in summary] == [
        ("mmlu_offline", "mmlu_offline (overall)", 0),
        ("mmlu_offline_stem", "stem", 1),
        ("mmlu_offline_humanities", "humanities", 1),
        ("tiny_mc", "tiny_mc", 0),
    ]
    assert [r.label for r in details] == ["anatomy", "virology", "philosophy"]


def test_score_prefers_acc_and_falls_back_to_another_metric():
    results = {"results": {"t": {"perplexity,none": 12.5, "perplexity_stderr,none": "N/A", "sample_len": 4},
                           "u": {"acc_norm,none": 0.4, "acc,none": 0.3, "acc_stderr,none": 0.1}}}
    t, u = results_io.score(results, "t"), results_io.score(results, "u")
    assert (t.metric, t.value, t.stderr, t.n) == ("perplexity", 12.5, None, 4)
    assert (u.metric, u.value, u.stderr) == ("acc", 0.3, 0.1)
    assert results_io.score(results, "missing") is None


def test_run_report_table_and_charts(tmp_path):
    run = write_evaluated_run(tmp_path / "run-sift", "sift", shift=0.1)
    path = report.write_run_report(run)
    assert path == run / "report.md"
    text = path.read_text()
    assert "| Task | N | base (%) | sift (%) | Δ sift (pp) |" in text
    assert "| **mmlu_offline (overall)** | 300 | 30.00 ± 2.00 | 40.00 ± 2.00 | +10.00 |" in text
    assert "| stem | 200 | 25.00 ± 3.00 | 35.00 ± 3.00 | +10.00 |" in text
    assert "| humanities | 100 | 40.00 ± 5.00 | 50.00 ± 5.00 | +10.00 |" in text
    assert "| virology | 80 | 32.50 ± 5.00 | 42.50 ± 5.00 | +10.00 |" in text  # in the details block
    assert text.index("<details>") < text.index("| virology")
    assert "cached results (fingerprint fp-base)" in text
    assert "![accuracy per category](eval_accuracy.png)" in text
    assert "![training curves](training_curves.png)" in text
    assert "| sift | 2.7000 (step 5) | 2.2000 (step 10) | -0.5000 |" in text
    assert _png(run / "eval_accuracy.png") and _png(run / "training_curves.png")
    summary = json.loads((run / "eval_summary.json").read_text())
    overall = summary["rows"][0]
    assert overall["task"] == "mmlu_offline" and overall["delta"]["sift"] == pytest.approx(0.1)
    assert overall["scores"]["base"] == {"metric": "acc", "value": 0.3, "stderr": 0.02, "n": 300}


def test_report_without_metrics_says_so(tmp_path):
    run = write_evaluated_run(tmp_path / "run", "lora", shift=0.0, metrics=False)
    (run / "training_curves.png").write_bytes(b"stale")
    text = report.write_run_report(run).read_text()
    assert "No training metrics" in text and "metrics.jsonl does not exist" in text
    assert not (run / "training_curves.png").exists()


def test_limited_evaluation_is_flagged(tmp_path):
    run = write_evaluated_run(tmp_path / "run", "sift", shift=0.0)
    for name in ("base", "tuned"):
        path = run / "eval" / name / "results.json"
        data = json.loads(path.read_text())
        data["sift_llm"]["eval_config"]["limit"] = 5
        path.write_text(json.dumps(data))
    text = report.write_run_report(run).read_text()
    assert "limit 5 per task" in text and "not comparable with full-benchmark results" in text


def test_compare_runs_one_table_and_chart(tmp_path):
    runs = [write_evaluated_run(tmp_path / "a", "sift", shift=0.10),
            write_evaluated_run(tmp_path / "b", "lora", shift=0.08),
            write_evaluated_run(tmp_path / "c", "full", shift=0.12)]
    out = report.compare_runs(runs, tmp_path / "cmp")
    text = out.read_text()
    assert "| Task | N | base (%) | sift (%) | lora (%) | full (%) | Δ sift (pp) | Δ lora (pp) | Δ full (pp) |" in text
    assert ("| **mmlu_offline (overall)** | 300 | 30.00 ± 2.00 | 40.00 ± 2.00 | 38.00 ± 2.00 | 42.00 ± 2.00 "
            "| +10.00 | +8.00 | +12.00 |") in text
    assert _png(tmp_path / "cmp" / "eval_accuracy.png") and _png(tmp_path / "cmp" / "training_curves.png")
    summary = json.loads((tmp_path / "cmp" / "eval_summary.json").read_text())
    assert [c["label"] for c in summary["columns"]] == ["base", "sift", "lora", "full"]


def test_compare_runs_labels_duplicates_and_separate_bases(tmp_path):
    runs = [write_evaluated_run(tmp_path / "s1", "sift", shift=0.1),
            write_evaluated_run(tmp_path / "s2", "sift", shift=0.2, base_fingerprint="other", base_shift=0.05)]
    text = report.compare_runs(runs, tmp_path / "cmp").read_text()
    assert "| base 1 (%) | base 2 (%) | sift (s1) (%) | sift (s2) (%) |" in text
    # each run against its own base
    assert "| +10.00 | +20.00 |" in text
    assert "different base models" in text


def test_run_without_results_is_a_clear_error(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    with pytest.raises(UserError, match=r"has no eval results .*run `sift-llm eval"):
        report.write_run_report(run)
    with pytest.raises(UserError, match="does not exist"):
        report.compare_runs([tmp_path / "nope", run], tmp_path / "out")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "not valid JSON"),
        ('"text"', "expected a JSON object"),
        ('{"loss": 1.0}', "'step' must be an integer"),
        ('{"step": 1.5, "loss": 1.0}', "'step' must be an integer"),
        ('{"step": 3, "loss": "high"}', "'loss' must be a number"),
        ('{"step": 3, "eval_loss": null}', "'eval_loss' must be a number"),
        ('{"step": "7", "tokens_per_s": 10}', "'step' must be an integer"),
    ],
)
def test_malformed_metrics_name_file_and_line(tmp_path, line, message):
    run = write_evaluated_run(tmp_path / "run", "sift", shift=0.0)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write(line + "\n")
    with pytest.raises(UserError, match=rf"metrics.jsonl:13: {message}"):
        report.write_run_report(run)


def test_metrics_lines_without_losses_are_kept(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"event": "resumed"}\n\n{"step": 2, "eval_loss": NaN}\n')
    records = results_io.read_metrics(path)
    assert len(records) == 3 and records[1] == {"event": "resumed"}


def test_report_command(tmp_path, capsys):
    a = write_evaluated_run(tmp_path / "a", "sift", shift=0.1)
    b = write_evaluated_run(tmp_path / "b", "lora", shift=0.1)
    assert main(["report", str(a)]) == 0
    assert capsys.readouterr().out.strip() == str(a / "report.md")
    assert main(["report", str(a), str(b), "--output", str(tmp_path / "cmp")]) == 0
    assert (tmp_path / "cmp" / "report.md").is_file()
    assert main(["report", str(a), str(b)]) == 2
    assert "give --output DIR" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
