"""Run lm-eval on a model, in memory: a model directory (+ SIFT/LoRA adapter) loaded by ``sift_llm.loading``,
or an already loaded model; the base model's results cached by fingerprint.

One evaluation is up to two ``simple_evaluate`` calls on the same loaded model: the held-out tasks on the
run's validation split (every example, no limit) and the configured benchmark tasks (``eval.limit``).
Every path forces the Hugging Face libraries offline; task data comes from local files (the mmlu_offline
and held-out tasks) or from what is already in the local datasets cache (lm-eval's own tasks). The lm_eval
CLI backend lives in ``cli_backend``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation import heldout as heldout_tasks
from sift_llm.evaluation import results as results_io
from sift_llm.evaluation.config import EvalConfig, eval_cache_dir
from sift_llm.evaluation.heldout import HeldOutSource
from sift_llm.evaluation.tasks import build_task_manager, check_tasks, heldout_task_manager, task_metadata
from sift_llm.fsio import atomic_write_json
from sift_llm.loading import check_model_dir, force_offline
from sift_llm.loading import load_model  # noqa: F401  (sift_llm.train.methods imports it from here; use sift_llm.loading)
from sift_llm.runtime import log
from sift_llm.schema import to_dict

# Part of every cached-result fingerprint: bump when a change here can change a score.
EVAL_CODE_VERSION = "2"


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-task note about passing kwargs to custom datasets (57 of them for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _lm_eval_logging() -> Iterator[None]:
    target = logging.getLogger("lm_eval.api.task")
    quiet = _QuietCustomDataset()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


def stamp(results: dict[str, Any], cfg: EvalConfig, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """Record in ``results["sift_llm"]`` what was evaluated, how, and by which code."""
    import lm_eval

    results["sift_llm"] = {
        **info,
        "eval_config": to_dict(cfg),
        "eval_code_version": EVAL_CODE_VERSION,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "cached": False,
        **extra,
    }
    return results


# ------------------------------------------------------------------------------------------ in memory


def evaluate_loaded(model: Any, tokenizer: Any, cfg: EvalConfig, *, info: dict[str, Any] | None = None,
                    heldout: HeldOutSource | None = None) -> dict:
    """lm-eval on an already loaded HF causal LM; returns the JSON-safe results dict."""
    from sift_llm.evaluation.lm import DatasetTokensLM

    force_offline()
    check_tasks(cfg)
    lm = DatasetTokensLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    return evaluate_lm(lm, cfg, info=info, heldout=heldout)


def evaluate_lm(lm: Any, cfg: EvalConfig, *, info: dict[str, Any] | None = None,
                heldout: HeldOutSource | None = None) -> dict:
    """lm-eval on any ``lm_eval.api.model.LM`` (e.g. a stub in tests): the held-out tasks (when ``heldout``
    names any), then ``cfg.tasks``."""
    force_offline()
    check_tasks(cfg)
    start = time.perf_counter()
    parts = []
    if heldout is not None and heldout.tasks:
        log(f"eval: held-out {', '.join(heldout.tasks)} on {heldout.dataset}")
        parts.append(_simple_evaluate(
            lm, heldout.tasks, heldout_task_manager(heldout), limit=None, num_fewshot=0, chat=False,
            gen_kwargs={"max_gen_toks": heldout.max_new_tokens, "do_sample": False}))
    manager = build_task_manager(cfg, task_metadata(cfg))
    parts.append(_simple_evaluate(lm, list(cfg.tasks), manager, limit=cfg.limit, num_fewshot=cfg.num_fewshot,
                                  chat=cfg.apply_chat_template))
    raw = _combine(parts)
    samples = raw.get("samples") or {}
    extra: dict[str, Any] = {"per_doc": results_io.per_doc_values(samples)}
    if heldout is not None and heldout.tasks:
        extra["heldout"] = {"dataset": str(heldout.dataset), "data_fingerprint": heldout.fingerprint,
                            "max_new_tokens": heldout.max_new_tokens}
        extra["generations"] = _generations(samples.get(heldout_tasks.GENERATION, []))
    out = results_io.clean_results(raw, keep_samples=cfg.log_samples)
    _add_nll_stderr(out, extra["per_doc"])
    return stamp(out, cfg, info or {}, backend="memory", elapsed_s=round(time.perf_counter() - start, 3), **extra)


def _simple_evaluate(lm: Any, tasks: list[str], manager: Any, *, limit, num_fewshot: int, chat: bool,
                     gen_kwargs: dict | None = None) -> dict:
    from lm_eval import simple_evaluate

    with _lm_eval_logging():
        raw = simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                              log_samples=True, apply_chat_template=chat, gen_kwargs=gen_kwargs)
    if raw is None:  # lm-eval returns None on non-zero ranks of its own distributed runs
        raise RuntimeError("lm-eval returned no results (called on a non-zero rank?)")
    return raw


def _combine(parts: list[dict]) -> dict:
    """One lm-eval output from several: mappings keyed by task are merged, the rest is the last part's."""
    out = dict(parts[-1])
    for key in ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better",
                "n-samples", "samples"):
        merged: dict = {}
        for part in parts:
            if isinstance(part.get(key), dict):
                merged.update(part[key])
        if merged or key in out:
            out[key] = merged
    return out


def _generations(records: list[dict]) -> list[dict]:
    out = []
    for record in sorted(records, key=lambda r: r.get("doc_id", 0)):
        doc = record.get("doc") or {}
        response = record.get("filtered_resps") or record.get("resps") or [""]
        while isinstance(response, list):
            response = response[0] if response else ""
        out.append({"index": doc.get("index", record.get("doc_id")), "prompt": doc.get("prompt", ""),
                    "reference": doc.get("reference", ""), "response": str(response)})
    return out


def _add_nll_stderr(results: dict, per_doc: dict) -> None:
    """lm-eval has no standard error for a custom aggregation: add the token-weighted NLL's (ratio
    estimator over documents) and the perplexity's (delta method) from the per-document records."""
    entry = results.get("results", {}).get(heldout_tasks.LIKELIHOOD)
    record = per_doc.get(heldout_tasks.LIKELIHOOD)
    if not isinstance(entry, dict) or not record:
        return
    nll, stderr, tokens = results_io.token_nll(record["values"])
    entry["nll_stderr,none"] = stderr
    entry["token_perplexity_stderr,none"] = math.exp(nll) * stderr if stderr is not None else None
    entry["tokens"] = tokens


def evaluate_in_memory(model_dir: str | os.PathLike, cfg: EvalConfig, adapter_dir: str | os.PathLike | None = None,
                       heldout: HeldOutSource | None = None) -> dict:
    start = time.perf_counter()
    model, tokenizer, info = load_model(model_dir, adapter_dir, device=cfg.device, dtype=cfg.dtype)
    label = f"{info['model']}" + (f" + {info['adapter_kind']} adapter {info['adapter']}" if adapter_dir else "")
    log(f"eval: {label} on {info['device']} ({info['dtype']}), tasks {', '.join(cfg.tasks)}")
    results = evaluate_loaded(model, tokenizer, cfg, info=info, heldout=heldout)
    results["sift_llm"]["elapsed_s"] = round(time.perf_counter() - start, 3)
    del model
    return results


# -------------------------------------------------------------------------------------- entry points


def evaluate_model(
    model_dir: str | os.PathLike,
    cfg: EvalConfig,
    *,
    adapter_dir: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
    heldout: HeldOutSource | None = None,
) -> dict:
    """Evaluate ``model_dir`` (plus an adapter) with ``cfg.backend``; optionally write results.json."""
    if cfg.backend == "cli":
        from sift_llm.evaluation.cli_backend import evaluate_with_cli

        results = evaluate_with_cli(model_dir, cfg, adapter_dir, heldout=heldout)
    else:
        results = evaluate_in_memory(model_dir, cfg, adapter_dir, heldout=heldout)
    if output_path is not None:
        atomic_write_json(output_path, results)
    return results


def evaluate_base(
    model_dir: str | os.PathLike,
    cfg: EvalConfig,
    *,
    output_path: str | os.PathLike | None = None,
    heldout: HeldOutSource | None = None,
) -> dict:
    """Evaluate a base model, reusing cached results under the same fingerprint when ``cfg.cache_base``."""
    from sift_llm.evaluation import cache

    model_dir = check_model_dir(model_dir, "base model")
    if cfg.backend == "cli" and heldout is not None:
        from sift_llm.evaluation.cli_backend import HELDOUT_SKIPPED

        log(f"eval: held-out tasks skipped: {HELDOUT_SKIPPED}")
        heldout = None  # nor are they part of the cached result's fingerprint
    if not cfg.cache_base:
        return evaluate_model(model_dir, cfg, output_path=output_path, heldout=heldout)
    check_tasks(cfg)
    key, parts = cache.base_results_key(model_dir, cfg, heldout)
    cached_path = eval_cache_dir(cfg) / "base" / key / "results.json"
    results = None
    if cached_path.is_file():
        try:
            results = results_io.read_results(cached_path)
        except UserError as err:
            log(f"eval: ignoring unreadable cached base results ({err})")
    if results is not None:
        log(f"eval: base model {model_dir}: reusing cached results {cached_path} (fingerprint {key}); skipped")
        stamp_ = results.setdefault("sift_llm", {})
        # same fingerprint, same files: report the directory asked for, not where it was first evaluated
        stamp_.update(cached=True, cache_path=str(cached_path), model=str(model_dir))
    else:
        log(f"eval: base model {model_dir}: no cached results for fingerprint {key}; evaluating")
        results = evaluate_model(model_dir, cfg, heldout=heldout)
        results["sift_llm"].update(fingerprint=key, fingerprint_parts=parts)
        atomic_write_json(cached_path, results)
    if output_path is not None:
        atomic_write_json(output_path, results)
    return results
