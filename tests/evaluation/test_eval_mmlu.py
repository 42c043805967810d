"""The offline MMLU tasks: subject table, committed task files, data cleaning, and exact scoring."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from eval_helpers import always_a_lm, write_mmlu_file

from sift_llm.errors import UserError
from sift_llm.evaluation import EvalConfig, mmlu
from sift_llm.evaluation.harness import evaluate_lm
from sift_llm.schema import build

STOCK_MMLU = Path(__import__("lm_eval").__file__).parent / "tasks" / "mmlu" / "default"


class _TaggedLoader(yaml.SafeLoader):
    """Reads our task files: keeps a ``!function`` reference as its text."""


_TaggedLoader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _read(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_TaggedLoader)


def _stock_subjects() -> dict[str, dict]:
    out = {}
    for path in sorted(STOCK_MMLU.glob("mmlu_*.yaml")):
        data = yaml.safe_load(path.read_text())
        out[data["dataset_name"]] = data
    return out


def test_committed_task_files_match_the_subject_table():
    assert mmlu.task_files_out_of_sync(mmlu.COMMITTED_TASK_DIR) == []
    assert mmlu.main(["--check"]) == 0


def test_check_reports_stale_missing_and_extra_files(tmp_path):
    copy = tmp_path / "mmlu_offline"
    shutil.copytree(mmlu.COMMITTED_TASK_DIR, copy)
    (copy / "mmlu_offline_anatomy.yaml").write_text("task: changed\n")
    (copy / "_mmlu_offline_stem.yaml").unlink()
    (copy / "extra.yaml").write_text("task: extra\n")
    problems = mmlu.task_files_out_of_sync(copy)
    assert "stale: mmlu_offline_anatomy.yaml" in problems
    assert "missing: _mmlu_offline_stem.yaml" in problems
    assert "extra: extra.yaml" in problems
    assert mmlu.main(["--check", "--dir", str(copy)]) == 1
    assert mmlu.main(["--write", "--dir", str(copy)]) == 0
    assert mmlu.task_files_out_of_sync(copy) == []


def test_subject_table_matches_lm_eval_mmlu():
    stock = _stock_subjects()
    assert len(mmlu.SUBJECTS) == 57
    assert {s: d["tag"].removeprefix("mmlu_").removesuffix("_tasks") for s, d in stock.items()} == mmlu.SUBJECTS
    assert set(mmlu.subjects_by_category()) == {"stem", "humanities", "social_sciences", "other"}


def test_prompt_and_metric_are_lm_eval_mmlu_defaults():
    stock_template = yaml.safe_load((STOCK_MMLU / "_default_template_yaml").read_text())
    ours = _read(mmlu.COMMITTED_TASK_DIR / mmlu.TEMPLATE_FILE)
    for key in ("output_type", "doc_to_text", "doc_to_choice", "doc_to_target", "metric_list", "test_split"):
        assert ours[key] == stock_template[key], key
    assert ours["custom_dataset"] == "!function sift_llm.evaluation.mmlu.load_subject_dataset"
    assert "dataset_path" not in ours  # nothing points at the hub
    stock = _stock_subjects()
    for subject, category in mmlu.SUBJECTS.items():
        task = _read(mmlu.COMMITTED_TASK_DIR / f"mmlu_offline_{subject}.yaml")
        assert task["description"] == stock[subject]["description"]
        assert task["tag"] == f"mmlu_offline_{category}_tasks"
        assert task["dataset_kwargs"] == {"subject": subject}  # one key only


def test_groups_aggregate_by_size_like_lm_eval_mmlu():
    stock = yaml.safe_load((STOCK_MMLU / "_mmlu.yaml").read_text())
    top = _read(mmlu.COMMITTED_TASK_DIR / "_mmlu_offline.yaml")
    assert top["group"] == "mmlu_offline"
    assert top["task"] == [t.replace("mmlu_", "mmlu_offline_") for t in stock["task"]]
    assert top["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    for category in mmlu.CATEGORIES:
        group = _read(mmlu.COMMITTED_TASK_DIR / f"_mmlu_offline_{category}.yaml")
        assert group["task"] == [f"mmlu_offline_{category}_tasks"]
        assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]


def test_read_mmlu_file_cleans_rows(tmp_path):
    path = write_mmlu_file(tmp_path / "m.jsonl", {"anatomy": ["A", "C"], "virology": ["D"]})
    with open(path, "a") as handle:
        handle.write("\n")  # a blank line is skipped
    rows = mmlu.read_mmlu_file(path)
    assert sorted(rows) == ["anatomy", "virology"]  # header rows (correct_answer == "answer") dropped
    assert rows["anatomy"][1] == {
        "question": "Question 1 about anatomy?", "subject": "anatomy",
        "choices": ["first 1", "second 1", "third 1", "fourth 1"], "answer": 2,
    }
    dataset = mmlu.load_subject_dataset(subject="virology", mmlu_file=str(path), version=1.0)
    assert dataset["test"][0]["answer"] == 3


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                     "correct_answer": "E", "topic": "anatomy"}), "correct_answer is 'E'"),
        (json.dumps({"question": "q", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                     "correct_answer": "A", "topic": "astrology"}), "unknown MMLU topic 'astrology'"),
        (json.dumps({"question": "q", "answer_a": "a", "correct_answer": "A", "topic": "anatomy"}),
         "answer_b, answer_c, answer_d"),
    ],
)
def test_read_mmlu_file_names_the_bad_line(tmp_path, line, message):
    path = write_mmlu_file(tmp_path / "bad.jsonl", {"anatomy": ["A"]}, header_rows=False)
    with open(path, "a") as handle:
        handle.write(line + "\n")
    with pytest.raises(UserError, match=f"bad.jsonl:2: .*{message}"):
        mmlu.read_mmlu_file(path)


def test_missing_file_and_missing_subject_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        mmlu.load_subject_dataset(subject="anatomy", mmlu_file=str(tmp_path / "nope.jsonl"))
    path = write_mmlu_file(tmp_path / "m.jsonl", {"anatomy": ["A"]})
    with pytest.raises(UserError, match="no questions for subject 'virology'"):
        mmlu.load_subject_dataset(subject="virology", mmlu_file=str(path))


def test_data_file_from_environment(tmp_path, monkeypatch):
    path = write_mmlu_file(tmp_path / "env.jsonl", {"anatomy": ["B"]})
    monkeypatch.setenv(mmlu.ENV_FILE, str(path))
    assert mmlu.resolve_mmlu_file(None) == path
    assert mmlu.load_subject_dataset(subject="anatomy")["test"][0]["answer"] == 1


def test_always_a_model_scores_the_share_of_a_answers(all_subjects_mmlu):
    path, rows = all_subjects_mmlu
    cfg = build(EvalConfig, {"tasks": ["mmlu_offline"], "mmlu_file": str(path)}, "eval")
    results = evaluate_lm(always_a_lm(), cfg)["results"]

    def share(letters: list[str]) -> float:
        return sum(letter == "A" for letter in letters) / len(letters)

    for subject, letters in rows.items():
        assert results[f"mmlu_offline_{subject}"]["acc,none"] == pytest.approx(share(letters), abs=1e-12)
        assert results[f"mmlu_offline_{subject}"]["sample_len"] == len(letters)
    for category, subjects in mmlu.subjects_by_category().items():
        letters = [x for s in subjects for x in rows[s]]
        assert results[f"mmlu_offline_{category}"]["acc,none"] == pytest.approx(share(letters), abs=1e-12)
        assert results[f"mmlu_offline_{category}"]["sample_len"] == len(letters)
    everything = [x for letters in rows.values() for x in letters]
    assert results["mmlu_offline"]["acc,none"] == pytest.approx(share(everything), abs=1e-12)
    # size-weighted, not the mean of the category means
    category_means = [results[f"mmlu_offline_{c}"]["acc,none"] for c in mmlu.CATEGORIES]
    assert results["mmlu_offline"]["acc,none"] != pytest.approx(sum(category_means) / 4, abs=1e-6)


def test_single_category_and_subject_tasks_work(all_subjects_mmlu):
    path, rows = all_subjects_mmlu
    cfg = build(EvalConfig, {"tasks": ["mmlu_offline_humanities", "mmlu_offline_virology"], "mmlu_file": str(path)},
                "eval")
    results = evaluate_lm(always_a_lm(), cfg)["results"]
    assert results["mmlu_offline_virology"]["sample_len"] == len(rows["virology"])
    assert "mmlu_offline_humanities" in results and "mmlu_offline" not in results


def test_fewshot_is_refused_for_offline_mmlu(all_subjects_mmlu):
    path, _ = all_subjects_mmlu
    cfg = build(EvalConfig, {"num_fewshot": 5, "mmlu_file": str(path)}, "eval")
    with pytest.raises(UserError, match="only a test split"):
        evaluate_lm(always_a_lm(), cfg)


def test_task_dir_is_generated_when_not_in_a_source_checkout(tmp_path, monkeypatch):
    monkeypatch.setattr(mmlu, "COMMITTED_TASK_DIR", tmp_path / "absent")
    generated = mmlu.task_dir()
    assert generated.is_relative_to(tmp_path / "cache")  # $SIFT_LLM_CACHE from the autouse fixture
    assert mmlu.task_files_out_of_sync(generated) == []
