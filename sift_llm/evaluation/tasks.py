"""Which tasks lm-eval sees: the task directories (offline MMLU, the held-out tasks, the config's own), the
metadata handed to the task hooks, checks of the requested tasks, and the TaskManager."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation import heldout, mmlu
from sift_llm.evaluation.config import EvalConfig


def include_dirs(cfg: EvalConfig) -> list[Path]:
    """The task directories lm-eval indexes: the offline MMLU tasks, then ``cfg.include_paths``."""
    dirs = [mmlu.task_dir()]
    for entry in cfg.include_paths:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise UserError(f"eval.include_paths: {path} is not a directory")
        dirs.append(path.resolve())
    return dirs


def check_tasks(cfg: EvalConfig) -> None:
    if cfg.num_fewshot > 0 and mmlu.uses_offline_mmlu(cfg.tasks):
        raise UserError(
            "eval.num_fewshot: the offline MMLU has only a test split, so there are no dev questions to draw "
            "shots from; use num_fewshot 0 (the SIFT paper's protocol) or lm-eval's own mmlu task"
        )
    reserved = [t for t in cfg.tasks if t in heldout.TASKS]
    if reserved:
        raise UserError(
            f"eval.tasks: {', '.join(reserved)} is evaluated from the run's own held-out split; "
            "turn it on with eval.heldout / eval.samples, not in eval.tasks"
        )


def task_metadata(cfg: EvalConfig) -> dict[str, Any]:
    """Task metadata handed to lm-eval: where the offline MMLU data lives (resolved, fetched if needed)."""
    if mmlu.uses_offline_mmlu(cfg.tasks):
        return {"mmlu_file": str(mmlu.resolve_mmlu_file(cfg.mmlu_file))}
    return {}


def build_task_manager(cfg: EvalConfig, metadata: dict[str, Any] | None = None):
    """A TaskManager that knows ``cfg.tasks``; lm-eval's ~10k built-in task files are indexed only when a
    task is not found in the include directories (indexing them costs several seconds)."""
    from lm_eval.tasks import TaskManager

    dirs = [str(d) for d in include_dirs(cfg)]
    metadata = task_metadata(cfg) if metadata is None else metadata
    manager = TaskManager(include_path=dirs, include_defaults=False, metadata=metadata)
    if all(t in manager.all_tasks for t in cfg.tasks):
        return manager
    manager = TaskManager(include_path=dirs, include_defaults=True, metadata=metadata)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks and not _is_pattern_or_file(t)]
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
        raise UserError(f"eval.tasks: unknown lm-eval task(s) {', '.join(hints)}")
    return manager


def heldout_task_manager(source: heldout.HeldOutSource):
    """A TaskManager that knows only the held-out tasks, with the run's dataset in their metadata."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(heldout.task_dir())], include_defaults=False, metadata=source.metadata())


def _is_pattern_or_file(name: str) -> bool:
    return any(ch in name for ch in "*?[") or name.endswith((".yaml", ".yml")) or os.sep in name
