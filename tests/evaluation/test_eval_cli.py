"""``sift-llm eval``: run-directory mode, free-form mode, help and input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from eval_helpers import write_run_dir

from sift_llm.cli import main
from sift_llm.evaluation import pipeline


def _eval_section(tiny_task_dir, **extra) -> dict:
    return {"tasks": ["tiny_mc"], "include_paths": [str(tiny_task_dir)], "batch_size": 4, **extra}


def test_help_is_fast_and_describes_both_modes():
    out = subprocess.run([sys.executable, "-m", "sift_llm.cli", "eval", "--help"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert "sift-llm eval RUN_DIR" in out and "--model DIR" in out and "eval.num_fewshot" in out
    assert "mmlu_offline" in out
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from sift_llm.cli import build_parser; build_parser();"
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lm_eval')))"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert "lm_eval" not in out  # heavy imports wait for run()


def test_run_dir_mode_end_to_end(tiny_model_dir, tiny_task_dir, lora_adapter_dir, tmp_path, capsys):
    import shutil

    run = write_run_dir(tmp_path / "run", model_path=tiny_model_dir, method="lora",
                        eval_section=_eval_section(tiny_task_dir))
    shutil.copytree(lora_adapter_dir, run / "adapter")
    assert main(["eval", str(run)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == str(run / "report.md")
    assert "no cached results" in captured.out
    base = json.loads((run / "eval" / "base" / "results.json").read_text())
    tuned = json.loads((run / "eval" / "tuned" / "results.json").read_text())
    assert tuned["sift_llm"]["adapter_kind"] == "lora" and tuned["sift_llm"]["adapter"] == str(run / "adapter")
    assert "tiny_mc" in base["results"] and "tiny_mc" in tuned["results"]
    text = (run / "report.md").read_text()
    assert "| Task | N | base (%) | lora (%) | Δ lora (pp) |" in text and "| **tiny_mc** | 10 |" in text
    for name in ("eval_accuracy.png", "training_curves.png", "eval_summary.json"):
        assert (run / name).stat().st_size > 0

    # a rerun reuses the base results; command-line overrides apply to the eval: section
    assert main(["eval", str(run), "eval.limit=4"]) == 0
    assert "no cached results" in capsys.readouterr().out  # another limit: another fingerprint
    assert main(["eval", str(run), "eval.limit=4"]) == 0
    assert "reusing cached results" in capsys.readouterr().out
    tuned = json.loads((run / "eval" / "tuned" / "results.json").read_text())
    assert tuned["results"]["tiny_mc"]["sample_len"] == 4


def test_run_dir_with_merged_model_and_asset_model_path(tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    import shutil

    run = write_run_dir(tmp_path / "run", model_path=tiny_model_dir, method="full",
                        eval_section=_eval_section(tiny_task_dir, limit=2))
    shutil.copytree(tiny_model_dir, run / "merged")
    assert pipeline.tuned_source(run) == ("merged", run / "merged")
    assert pipeline.evaluate_run(run) == run / "report.md"
    assert json.loads((run / "eval" / "tuned" / "results.json").read_text())["sift_llm"]["model"] == str(run / "merged")

    import sift_llm.assets

    monkeypatch.setattr(sift_llm.assets, "resolve", lambda ref: tiny_model_dir if ref == "asset:tiny" else None)
    (run / "config.yaml").write_text("model: {path: 'asset:tiny'}\n")
    assert pipeline.read_run_eval_config(run).model_path == tiny_model_dir


def test_free_form_mode(tiny_model_dir, tiny_task_dir, lora_adapter_dir, tmp_path, capsys):
    common = ["eval.tasks=[tiny_mc]", f"eval.include_paths=[{tiny_task_dir}]", "eval.limit=3", "eval.batch_size=2"]
    out = tmp_path / "plain"
    assert main(["eval", "--model", str(tiny_model_dir), *common, "--output", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.md")
    results = json.loads((out / "results.json").read_text())
    assert results["results"]["tiny_mc"]["sample_len"] == 3
    assert results["sift_llm"]["eval_config"]["batch_size"] == 2

    out = tmp_path / "adapter"
    assert main(["eval", "--model", str(tiny_model_dir), "--adapter", str(lora_adapter_dir), *common,
                 "--output", str(out)]) == 0
    assert "reusing cached results" in capsys.readouterr().out  # the base was evaluated just above
    assert (out / "eval" / "base" / "results.json").is_file() and (out / "eval" / "tuned" / "results.json").is_file()
    assert "Δ tuned (pp)" in (out / "report.md").read_text()
    # the free-form output is laid out like a run directory
    assert main(["report", str(out)]) == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval"], "give a RUN_DIR, or --model DIR"),
        (["eval", "--model", "m"], "free-form mode needs --output DIR"),
        (["eval", "RUN", "--model", "m"], "--model belong to free-form mode"),
        (["eval", "--model", "m", "--adapter", "a", "--base", "b", "--output", "o"], "--base is for a merged"),
        (["eval", "--model", "{tmp}/nope", "--output", "{tmp}/o", "eval.tasks=[x]"], "does not exist"),
        (["eval", "--model", "{tmp}", "--output", "{tmp}/o", "eval.limit=2.5"], "eval.limit: 2.5 is a float >= 1"),
        (["eval", "--model", "{tmp}", "--output", "{tmp}/o", "train.max_steps=3"], "only eval.* keys apply"),
        (["eval", "{tmp}"], "has no config.yaml"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bad_run_config(tmp_path, tiny_model_dir, capsys):
    run = write_run_dir(tmp_path / "run", model_path=tiny_model_dir, method="sift", eval_section={"limt": 3})
    assert main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: unknown key 'eval.limt'; did you mean 'eval.limit'?" in err
    (run / "config.yaml").write_text("model: {path: 5}\n")
    assert main(["eval", str(run)]) == 2
    assert "model.path: got 5, expected a string" in capsys.readouterr().err
    (run / "config.yaml").write_text("model: {path: x}\n")
    assert main(["eval", str(run)]) == 2
    assert "has no trained model to evaluate" in capsys.readouterr().err


def test_cli_backend_scores_merged_where_a_sift_adapter_has_no_peft_form(tiny_model_dir, tiny_task_dir, tmp_path,
                                                                          monkeypatch):
    """A 4-bit SIFT adapter goes to merged/ on the cli backend; so does a selection PEFT refuses to pad."""
    import shutil

    from sift_llm.evaluation import harness
    from sift_llm.errors import UserError
    from sift_llm.sift.peft_export import PeftPaddingError

    run = write_run_dir(tmp_path / "run", model_path=tiny_model_dir, method="sift",
                        eval_section=_eval_section(tiny_task_dir, limit=2, backend="cli"))
    (run / "adapter").mkdir()
    meta = {"base_model": {"quantization": {"quant_type": "nf4"}}}
    (run / "adapter" / "sift_adapter.json").write_text(json.dumps(meta))
    assert pipeline.tuned_source(run, "memory") == ("adapter", run / "adapter")  # applied to the 4-bit base
    with pytest.raises(UserError, match="4-bit base.*train.save_merged=true"):
        pipeline.tuned_source(run, "cli")
    shutil.copytree(tiny_model_dir, run / "merged")
    assert pipeline.tuned_source(run, "cli") == ("merged", run / "merged")

    # A full-precision SIFT adapter is scored as itself; when its export is refused, merged/ takes its place.
    (run / "adapter" / "sift_adapter.json").write_text(json.dumps({"base_model": {}}))
    assert pipeline.tuned_source(run, "cli") == ("adapter", run / "adapter")
    scored = []

    def fake_evaluate_model(model, cfg, adapter_dir=None, **kwargs):
        if adapter_dir is not None:
            raise PeftPaddingError("the export would be 95% zero padding")
        scored.append(model)
        return real_evaluate_model(model, cfg, **kwargs)

    real_evaluate_model = harness.evaluate_model
    monkeypatch.setattr(harness, "evaluate_model", fake_evaluate_model)
    assert pipeline.evaluate_run(run) == run / "report.md"
    assert Path(scored[-1]).resolve() == (run / "merged").resolve()  # after the base (unless cached)
    assert json.loads((run / "eval" / "tuned" / "results.json").read_text())["sift_llm"]["model"] == str(run / "merged")
