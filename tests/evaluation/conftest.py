"""Fixtures for the evaluation tests (helpers live in eval_helpers.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from eval_helpers import answer_pattern, make_lora_adapter, write_mmlu_file, write_tiny_tasks  # noqa: E402

from sift_llm.evaluation import mmlu  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own sift-llm cache, so base results never leak between tests."""
    monkeypatch.setenv("SIFT_LLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def tiny_task_dir(tmp_path_factory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("tiny-tasks"))


@pytest.fixture
def all_subjects_mmlu(tmp_path) -> tuple[Path, dict[str, list[str]]]:
    rows = {subject: answer_pattern(i) for i, subject in enumerate(mmlu.SUBJECTS)}
    return write_mmlu_file(tmp_path / "mmlu.jsonl", rows), rows


@pytest.fixture(scope="session")
def lora_adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("lora") / "adapter")
