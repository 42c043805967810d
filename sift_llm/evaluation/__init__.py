"""Evaluation stage: lm-eval on a base model, base + adapter (in memory) or a merged model; reports.

Entry points (heavy imports happen on first use):

* :class:`EvalConfig` - the ``eval:`` section of an experiment config.
* :func:`evaluate_run` - evaluate a training run directory (base, cached, and the tuned model) and write
  its report; what ``sift-llm eval RUN_DIR`` does.
* :func:`evaluate_model` / :func:`evaluate_base` - one model directory (+ adapter) to a results dict.
* :func:`evaluate_loaded` - an already loaded model and tokenizer.
* :func:`write_run_report` / :func:`compare_runs` - markdown + PNG reports.
"""

from __future__ import annotations

import importlib
from typing import Any

from sift_llm.evaluation.config import EvalConfig

_LAZY = {
    "evaluate_model": "sift_llm.evaluation.harness",
    "evaluate_base": "sift_llm.evaluation.harness",
    "evaluate_loaded": "sift_llm.evaluation.harness",
    "load_model": "sift_llm.loading",
    "evaluate_run": "sift_llm.evaluation.pipeline",
    "read_run_eval_config": "sift_llm.evaluation.pipeline",
    "write_run_report": "sift_llm.evaluation.report",
    "compare_runs": "sift_llm.evaluation.report",
}

__all__ = ["EvalConfig", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
