"""``sift-llm analyze`` on the tiny model: outputs written, both models measured, bad options refused clearly."""

from __future__ import annotations

import json

import pytest

from sift_llm.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = {"shares_per_matrix.png", "coverage.png", "layers_heatmap.png", "density_curve.png"}


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, tiny_model_dir, experiment_writer):
    """One full CLI run (3 batches, pretrained and random init), shared by the output checks."""
    tmp = tmp_path_factory.mktemp("analyze")
    config = experiment_writer(tmp, tiny_model_dir, seed=7)
    out = tmp / "out"
    code = main(["analyze", str(config), "analysis.batches=3", "analysis.shares=[0.01,0.1,0.5]", "analysis.keep=0.8",
                 f"analysis.output={out}"])
    assert code == 0
    return out, json.loads((out / "analysis.json").read_text())


def test_outputs_are_written(analysed):
    out, result = analysed
    names = {path.name for path in out.iterdir()}
    assert names == FIGURES | {"analysis.json", "summary.md"}  # no temporary files left behind
    for figure in FIGURES:
        blob = (out / figure).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000
    assert result["figures"] and set(result["figures"]) == FIGURES
    summary = (out / "summary.md").read_text()
    for heading in ("Top entries' share", "Batch 1's top-1% set", "Most critical layers", "Suggested density"):
        assert heading in summary
    for figure in FIGURES:
        assert f"]({figure})" in summary
    assert "NaN" not in (out / "analysis.json").read_text()


def test_json_holds_both_models_on_the_same_batches(analysed):
    _, result = analysed
    setup = result["setup"]
    assert setup["batches"] == 3 and setup["micro_batch_size"] == 2 and setup["matrices"] == 14
    assert setup["analysis"]["shares"] == [0.01, 0.1, 0.5] and setup["analysis"]["keep"] == 0.8
    assert "squared" in setup["definition"]
    pre, rnd = result["models"]["pretrained"], result["models"]["random_init"]
    for model in (pre, rnd):
        assert set(model) >= {"matrices", "overall", "coverage", "breakdown", "density", "losses"}
        assert len(model["losses"]) == 3 and len(model["matrices"]) == 14
        assert list(model["overall"]["top_share"]) == ["1%", "10%", "50%"]
        shares = [model["overall"]["top_share"][k]["pooled"] for k in ("1%", "10%", "50%")]
        assert 0 < shares[0] < shares[1] < shares[2] <= 1
        assert [row["batch"] for row in model["coverage"]["per_batch"]] == [1, 2, 3]
        assert model["density"]["keep"] == 0.8 and model["density"]["suggested"] is not None
    assert [r["name"] for r in pre["matrices"]] == [r["name"] for r in rnd["matrices"]]
    # Different weights (the tiny "pretrained" model is itself random, with another seed), same data.
    assert pre["losses"] != rnd["losses"]


def test_no_random_init(analysis_config, tmp_path):
    out = tmp_path / "only"
    assert main(["analyze", str(analysis_config()), "analysis.batches=1", "analysis.random_init=false",
                 f"analysis.output={out}"]) == 0
    result = json.loads((out / "analysis.json").read_text())
    assert list(result["models"]) == ["pretrained"]
    pre = result["models"]["pretrained"]
    assert pre["coverage"]["later_batches_mean"] is None and pre["density"]["first_batch_curve"] is None
    assert (out / "summary.md").is_file() and (out / "coverage.png").stat().st_size > 0


def test_default_output_is_the_run_directory(analysis_config, tmp_path):
    config = analysis_config(method={"sift": {"targets": ["q_proj", "down_proj"]}})
    assert main(["analyze", str(config), "analysis.batches=1", "analysis.random_init=false", "analysis.shares=[0.1]"]) == 0
    result = json.loads((tmp_path / "run" / "analysis" / "analysis.json").read_text())
    assert result["setup"]["matrices"] == 4
    assert {row["type"] for row in result["models"]["pretrained"]["matrices"]} == {"q_proj", "down_proj"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["analysis.shares=[0,0.01]"], "shares[0]: 0.0 is out of range, allowed (0, 1]"),
        (["analysis.shares=[0.01,1.5]"], "shares[1]: 1.5 is out of range"),
        (["analysis.shares=[1%,5%]"], "shares[0]"),
        (["analysis.keep=1.5"], "analysis.keep: 1.5 is out of range"),
        (["analysis.keep=0"], "analysis.keep: 0.0 is out of range"),
        (["analysis.batches=0"], "analysis.batches: 0 is out of range"),
        (["analysis.coverage_share=2"], "analysis.coverage_share: 2.0 is out of range"),
        (["method.sift.targets=[nothing_matches]"], "match no nn.Linear module"),
    ],
)
def test_bad_input_gives_a_clear_error(analysis_config, tmp_path, capsys, flags, message):
    out = tmp_path / "bad"
    assert main(["analyze", str(analysis_config()), *flags, f"analysis.output={out}"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress output
    assert last.startswith("sift-llm analyze: error: ") and message in last
    assert not (out / "analysis.json").exists()
