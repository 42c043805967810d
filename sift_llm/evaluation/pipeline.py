"""Evaluate a training run directory: its base model (cached) and its tuned model, then write the report.

RUN_DIR layout read here: ``config.yaml`` (``model.path``, ``method.name``, ``eval:``), ``adapter/`` (SIFT or
PEFT adapter) and/or ``merged/`` (an HF model directory), ``metrics.jsonl``. Written: ``eval/base/results.json``,
``eval/tuned/results.json``, ``report.md``, ``eval_summary.json`` and the PNG charts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation.config import EvalConfig
from sift_llm.runtime import is_rank0, log


@dataclass
class RunEvalSpec:
    run_dir: Path
    model_path: Path
    method: str | None
    eval: EvalConfig


def read_run_eval_config(run_dir: str | os.PathLike, overrides: dict[str, Any] | None = None) -> RunEvalSpec:
    """``model.path``, ``method.name`` and the ``eval:`` section (with ``overrides`` on top) of a run's
    resolved config.yaml, validated by the experiment-config loader."""
    from sift_llm import schema
    from sift_llm.assets import resolve
    from sift_llm.config import RESOLVED_NAME, load_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    path = run_dir / RESOLVED_NAME
    if not path.is_file():
        raise UserError(f"{run_dir} has no {RESOLVED_NAME}; is it a training run directory?")
    cfg = load_config(path)
    section = cfg.eval
    if overrides:
        section = schema.build(EvalConfig, {**schema.to_dict(cfg.eval), **overrides}, "eval")
    return RunEvalSpec(run_dir, resolve(cfg.model.path), cfg.method.name, section)


def tuned_source(run_dir: str | os.PathLike, backend: str = "memory") -> tuple[str, Path]:
    """('adapter', RUN_DIR/adapter) or ('merged', RUN_DIR/merged): what to evaluate as the tuned model.

    The adapter is preferred (it is what training produced, applied in memory); the CLI backend cannot
    load a SIFT adapter and falls back to merged/.
    """
    from sift_llm.evaluation.harness import ADAPTER_FILES, detect_adapter

    run_dir = Path(run_dir)
    adapter, merged = run_dir / "adapter", run_dir / "merged"
    has_adapter = adapter.is_dir() and any((adapter / f).is_file() for f in ADAPTER_FILES.values())
    has_merged = (merged / "config.json").is_file()
    if has_adapter and not (backend == "cli" and detect_adapter(adapter) == "sift"):
        return "adapter", adapter
    if has_merged:
        return "merged", merged
    if has_adapter:
        raise UserError(f"{adapter} is a SIFT adapter, which the cli backend cannot load, and {merged} does not "
                        "exist: use eval.backend memory")
    raise UserError(f"{run_dir} has no trained model to evaluate: expected {adapter}/ "
                    f"({' or '.join(ADAPTER_FILES.values())}) or {merged}/ (config.json)")


def evaluate_run(
    run_dir: str | os.PathLike,
    cfg: EvalConfig | None = None,
    *,
    overrides: dict[str, Any] | None = None,
) -> Path | None:
    """Evaluate the run's base model (cached) and tuned model, write results and the report.

    Returns the report path. Runs on rank 0 only (other ranks return None at once, so a distributed
    caller should barrier afterwards or, better, call this after the training processes have exited).
    """
    from sift_llm.evaluation import harness, report

    if not is_rank0():
        return None
    spec = read_run_eval_config(run_dir, overrides)
    cfg = cfg or spec.eval
    base_path, tuned_path = report.run_results_paths(spec.run_dir)
    kind, source = tuned_source(spec.run_dir, cfg.backend)
    harness.evaluate_base(spec.model_path, cfg, output_path=base_path)
    if kind == "adapter":
        harness.evaluate_model(spec.model_path, cfg, adapter_dir=source, output_path=tuned_path)
    else:
        harness.evaluate_model(source, cfg, output_path=tuned_path)
    path = report.write_run_report(spec.run_dir)
    log(f"eval: report written to {path}")
    return path
