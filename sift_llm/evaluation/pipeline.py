"""Evaluate a training run directory: its base model (cached) and its tuned model, then write the report.

RUN_DIR layout read here: ``config.yaml`` (``model.path``, ``method.name``, ``data:``, ``eval:``; read by the
experiment-config loader), ``adapter/`` (SIFT or PEFT adapter) and/or ``merged/`` (an HF model directory),
``train_summary.json`` (which prepared dataset the run trained on: its validation split is the held-out
set), ``metrics.jsonl``. Written: ``eval/base/results.json``, ``eval/tuned/results.json``, ``report.md``,
``eval_summary.json``, ``samples.json`` and the PNG charts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation.config import EvalConfig
from sift_llm.evaluation.heldout import HeldOutSource
from sift_llm.loading import ADAPTER_FILES, detect_adapter, has_adapter
from sift_llm.runtime import is_rank0, log

SUMMARY_NAME = "train_summary.json"


@dataclass
class RunEvalSpec:
    run_dir: Path
    model_path: Path
    method: str | None
    eval: EvalConfig
    experiment: Any = None  # the run's ExperimentConfig


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
    return RunEvalSpec(run_dir, resolve(cfg.model.path), cfg.method.name, section, cfg)


def tuned_source(run_dir: str | os.PathLike, backend: str = "memory") -> tuple[str, Path]:
    """('adapter', RUN_DIR/adapter) or ('merged', RUN_DIR/merged): what to evaluate as the tuned model.

    The adapter is preferred (it is what training produced). The memory backend applies it in memory; the
    cli backend hands lm_eval a PEFT adapter, a SIFT one exported to PEFT's supertuning format first. A SIFT
    adapter trained on a 4-bit base has no PEFT form (PEFT would apply it to the full-precision base), so the
    cli backend scores merged/ for it.
    """
    run_dir = Path(run_dir)
    adapter, merged = run_dir / "adapter", run_dir / "merged"
    found_adapter = has_adapter(adapter)
    has_merged = (merged / "config.json").is_file()
    cli_cannot = backend == "cli" and found_adapter and _quantized_sift_adapter(adapter)
    if found_adapter and not cli_cannot:
        return "adapter", adapter
    if has_merged:
        return "merged", merged
    if found_adapter:
        raise UserError(f"{adapter} is a SIFT adapter trained on a 4-bit base, which lm_eval's hf model cannot "
                        f"apply, and {merged} does not exist: use eval.backend memory, or train with "
                        "train.save_merged=true")
    raise UserError(f"{run_dir} has no trained model to evaluate: expected {adapter}/ "
                    f"({' or '.join(ADAPTER_FILES.values())}) or {merged}/ (config.json)")


def _quantized_sift_adapter(adapter: Path) -> bool:
    if detect_adapter(adapter) != "sift":
        return False
    try:
        meta = json.loads((adapter / ADAPTER_FILES["sift"]).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False  # the loader reports the broken file with its name
    base = meta.get("base_model") if isinstance(meta, dict) else None
    return bool(isinstance(base, dict) and base.get("quantization"))


def heldout_source(spec: RunEvalSpec) -> HeldOutSource | None:
    """The run's held-out split, from the dataset its train_summary.json names (rebuilt from the run's
    ``data:`` section when the cached copy is gone); None, with a note, when there is nothing to evaluate."""
    from sift_llm.evaluation.heldout import source_for
    from sift_llm.evaluation.results import read_json

    cfg = spec.eval
    if not cfg.heldout and cfg.samples == 0:
        return None
    summary = spec.run_dir / SUMMARY_NAME
    if not summary.is_file():
        log(f"eval: {summary} does not exist (not a finished training run), so the held-out likelihood and "
            "samples are skipped")
        return None
    recorded = read_json(summary)
    dataset = recorded.get("dataset") if isinstance(recorded, dict) else None
    if not isinstance(dataset, str):
        raise UserError(f"{summary}: expected a 'dataset' string (the prepared-data directory the run trained on)")
    dataset_dir = Path(dataset)
    if not (dataset_dir / "fingerprint.json").is_file() and spec.experiment is not None:
        from sift_llm.data.stage import prepare

        log(f"eval: the run's dataset {dataset_dir} is gone; rebuilding it from the run's data: section")
        rebuilt = prepare(spec.experiment.data, spec.experiment.model.path).path
        if rebuilt.resolve() != dataset_dir.resolve():
            raise UserError(f"{summary}: the run trained on {dataset_dir}, which is gone, and the run's data: "
                            f"section now builds a different dataset ({rebuilt})")
    if not (dataset_dir / "dataset" / "validation").is_dir():
        log(f"eval: the run's dataset {dataset_dir} has no validation split (data.validation_size 0), so the "
            "held-out likelihood and samples are skipped")
        return None
    return source_for(dataset_dir, likelihood=cfg.heldout, samples=cfg.samples, max_new_tokens=cfg.max_new_tokens)


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
    from sift_llm.evaluation.results import run_results_paths
    from sift_llm.sift.peft_export import PeftPaddingError

    if not is_rank0():
        return None
    spec = read_run_eval_config(run_dir, overrides)
    if cfg is not None:
        spec.eval = cfg
    cfg = spec.eval
    base_path, tuned_path = run_results_paths(spec.run_dir)
    kind, source = tuned_source(spec.run_dir, cfg.backend)
    heldout = heldout_source(spec)
    harness.evaluate_base(spec.model_path, cfg, output_path=base_path, heldout=heldout)
    if kind == "adapter":
        try:
            harness.evaluate_model(spec.model_path, cfg, adapter_dir=source, output_path=tuned_path, heldout=heldout)
        except PeftPaddingError as err:
            # The cli backend's PEFT export of a selection far from one sparsity (global scope): merged/ is
            # the same model, when the run wrote it.
            merged = spec.run_dir / "merged"
            if not (merged / "config.json").is_file():
                raise
            log(f"eval: {err}\neval: scoring {merged} instead")
            harness.evaluate_model(merged, cfg, output_path=tuned_path, heldout=heldout)
    else:
        harness.evaluate_model(source, cfg, output_path=tuned_path, heldout=heldout)
    path = report.write_run_report(spec.run_dir)
    log(f"eval: report written to {path}")
    return path
