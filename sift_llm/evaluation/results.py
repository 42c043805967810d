"""Reading evaluation results: lm-eval's output made JSON-safe, results.json files, headline scores, the task
tree, per-document records, a run directory's results and training metrics.

Nothing here runs a model or draws anything; the harness writes what this module reads, and the report
renders what it returns.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.train.metrics import read_metrics  # noqa: F401  (the metrics.jsonl reader lives with its writer)

PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "nll", "word_perplexity")
# Per-document values kept in results.json (for paired deltas), by metric: a float, or [loglikelihood, tokens].
PER_DOC_METRICS = ("acc", "nll")


# ------------------------------------------------------------------------------------- lm-eval output


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of lm-eval's output: numpy/torch scalars to numbers, NaN/inf to null, callables
    and other objects to strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def clean_results(raw: dict[str, Any], *, keep_samples: bool) -> dict[str, Any]:
    out = dict(raw)
    if not keep_samples:
        out.pop("samples", None)
    return jsonable(out)


def per_doc_values(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """{task: {"metric": name, "values": {doc_id: value}}} from lm-eval's logged samples, for the metrics
    in PER_DOC_METRICS: what a paired base-vs-tuned difference needs, without the prompts and responses."""
    out: dict[str, dict[str, Any]] = {}
    for task, records in samples.items():
        for metric in PER_DOC_METRICS:
            values = {str(r["doc_id"]): jsonable(r[metric]) for r in records if metric in r and "doc_id" in r}
            if values:
                out[task] = {"metric": metric, "values": values}
                break
    return out


def read_json(path: str | os.PathLike, missing: str | None = None) -> Any:
    """The JSON in ``path``; a missing file (``missing``: the message) or invalid JSON is a UserError."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(missing or f"{path} does not exist") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json written by this stage (or by lm-eval), checked for the ``results`` mapping."""
    data = read_json(path, missing=f"no eval results at {path}")
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"{path}: not an lm-eval results file (no 'results' mapping)")
    return data


# ---------------------------------------------------------------------------------------- scores


@dataclass
class Score:
    value: float | None
    stderr: float | None
    metric: str
    n: int | None


@dataclass
class Row:
    name: str  # the lm-eval task or group name
    label: str
    level: int  # 0: a requested task or group; 1: a category inside it; 2: a leaf in a detail table


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def score(results: dict[str, Any], name: str, metric: str | None = None) -> Score | None:
    """The headline metric of task/group ``name`` (acc when there is one, else the first preferred metric,
    else the first metric), or ``metric`` when given."""
    entry = results.get("results", {}).get(name)
    if not isinstance(entry, dict):
        return None
    metrics = {k: v for k, v in entry.items() if "," in k and "_stderr," not in k and number(v) is not None}
    if not metrics:
        return None
    chosen = None
    for wanted in ((metric,) if metric else PREFERRED_METRICS):
        chosen = next((k for k in metrics if k.split(",")[0] == wanted), None)
        if chosen:
            break
    if chosen is None and metric:
        return None
    chosen = chosen or sorted(metrics)[0]
    base, _, filt = chosen.partition(",")
    n = entry.get("sample_len")
    if n is None:
        n = (results.get("n-samples", {}).get(name) or {}).get("effective")
    return Score(
        value=number(metrics[chosen]),
        stderr=number(entry.get(f"{base}_stderr,{filt}")),
        metric=base,
        n=int(n) if isinstance(n, (int, float)) else None,
    )


def _strip_prefix(name: str, parent: str | None) -> str:
    if parent and name.startswith(parent + "_"):
        return name[len(parent) + 1 :]
    return name


def layout(results: dict[str, Any], skip: tuple[str, ...] = ()) -> tuple[list[Row], list[Row]]:
    """(summary rows, detail rows) from lm-eval's task tree.

    Top-level entries (not a member of any group) come first, each followed by its member groups (the
    MMLU categories). Leaf tasks under a group go to the detail rows. Tasks named in ``skip`` are left out.
    """
    entries = [name for name in results.get("results", {}) if name not in skip]
    tree: dict[str, list[str]] = {k: list(v) for k, v in (results.get("group_subtasks") or {}).items()}
    members = {child for children in tree.values() for child in children}
    summary: list[Row] = []
    details: list[Row] = []

    def descend(name: str, top: str) -> None:
        for child in tree.get(name, []):
            if tree.get(child):
                if name == top:
                    summary.append(Row(child, _strip_prefix(child, top), 1))
                else:
                    details.append(Row(child, _strip_prefix(child, top), 2))
                descend(child, top)
            else:
                details.append(Row(child, _strip_prefix(child, top), 2))

    for name in entries:
        if name not in members:
            summary.append(Row(name, f"{name} (overall)" if tree.get(name) else name, 0))
            descend(name, name)
    return summary, details


def merge_rows(all_results: list[dict[str, Any]], skip: tuple[str, ...] = ()) -> tuple[list[Row], list[Row]]:
    """The union of several results' rows, in first-seen order."""
    summary: dict[str, Row] = {}
    details: dict[str, Row] = {}
    for results in all_results:
        s, d = layout(results, skip)
        for row in s:
            summary.setdefault(row.name, row)
        for row in d:
            details.setdefault(row.name, row)
    return list(summary.values()), [r for r in details.values() if r.name not in summary]


def leaves(results: dict[str, Any], name: str) -> list[str]:
    """The leaf tasks under task or group ``name`` (itself when it is a task)."""
    tree = results.get("group_subtasks") or {}
    if not tree.get(name):
        return [name]
    return [leaf for child in tree[name] for leaf in leaves(results, child)]


# ---------------------------------------------------------------------------------- paired deltas


@dataclass
class Delta:
    """tuned minus base of one metric, with the standard error of that difference."""

    value: float
    stderr: float | None
    paired: bool  # from per-document differences on the same documents (else from the two stderrs)
    n: int | None = None  # documents in a paired difference
    # the two scores' stderrs combined as if independent: what the sample can resolve when a paired
    # difference is degenerate (no document changed, so its stderr is 0)
    unpaired_stderr: float | None = None

    @property
    def resolution(self) -> float | None:
        """The standard error to show as the noise scale: the paired one, unless it is 0."""
        return self.stderr if self.stderr else self.unpaired_stderr

    @property
    def within_noise(self) -> bool | None:
        """|delta| < 2 standard errors; None when the error is unknown."""
        if self.value == 0:
            return True
        if self.stderr is None:
            return None
        return abs(self.value) < 2 * self.stderr


def _paired_values(results: dict[str, Any], name: str) -> tuple[str, dict[str, Any]] | None:
    """(metric, {leaf/doc_id: value}) over every leaf of ``name``, when all leaves have per-doc records."""
    per_doc = (results.get("sift_llm") or {}).get("per_doc") or {}
    metric, values = None, {}
    for leaf in leaves(results, name):
        entry = per_doc.get(leaf)
        if not isinstance(entry, dict) or not isinstance(entry.get("values"), dict):
            return None
        if metric not in (None, entry.get("metric")):
            return None
        metric = entry.get("metric")
        values.update({f"{leaf}/{doc}": value for doc, value in entry["values"].items()})
    return (metric, values) if metric and values else None


def ratio_stderr(numerators: list[float], denominators: list[float]) -> float | None:
    """Standard error of sum(a)/sum(b) over documents (the ratio estimator's linearisation)."""
    n = len(numerators)
    if n < 2 or sum(denominators) <= 0:
        return None
    ratio = sum(numerators) / sum(denominators)
    mean_b = sum(denominators) / n
    spread = sum((a - ratio * b) ** 2 for a, b in zip(numerators, denominators)) / (n - 1)
    return math.sqrt(spread / n) / mean_b


def mean_stderr(values: list[float]) -> float | None:
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def token_nll(values: dict[str, Any]) -> tuple[float, float | None, int]:
    """(token-weighted mean NLL, its stderr, tokens) from per-doc [loglikelihood, tokens] records."""
    lls = [-float(v[0]) for v in values.values()]
    counts = [float(v[1]) for v in values.values()]
    return sum(lls) / sum(counts), ratio_stderr(lls, counts), int(sum(counts))


def delta(tuned: dict[str, Any], base: dict[str, Any], name: str, metric: str | None = None) -> Delta | None:
    """tuned minus base for task/group ``name``: paired over the same documents when both results carry
    per-document records of every leaf (the same documents), else with the two stderrs combined as if
    independent (sqrt(se_t^2 + se_b^2))."""
    t, b = score(tuned, name, metric), score(base, name, metric)
    if t is None or b is None or t.value is None or b.value is None:
        return None
    value = t.value - b.value
    unpaired = math.hypot(t.stderr, b.stderr) if t.stderr is not None and b.stderr is not None else None
    pt, pb = _paired_values(tuned, name), _paired_values(base, name)
    if pt and pb and pt[0] == pb[0] == t.metric and set(pt[1]) == set(pb[1]):
        keys = sorted(pt[1])
        if t.metric == "nll":
            diffs = [float(pb[1][k][0]) - float(pt[1][k][0]) for k in keys]  # per-doc NLL sum, tuned - base
            counts = [float(pt[1][k][1]) for k in keys]
            return Delta(value, ratio_stderr(diffs, counts), paired=True, n=len(keys), unpaired_stderr=unpaired)
        diffs = [float(pt[1][k]) - float(pb[1][k]) for k in keys]
        return Delta(value, mean_stderr(diffs), paired=True, n=len(keys), unpaired_stderr=unpaired)
    return Delta(value, unpaired, paired=False, unpaired_stderr=unpaired)


# ---------------------------------------------------------------------------------- generations


def generations(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out generation samples a results file carries (index, prompt, reference, response)."""
    found = (results.get("sift_llm") or {}).get("generations")
    return [g for g in found if isinstance(g, dict)] if isinstance(found, list) else []


# ---------------------------------------------------------------------------------------- metrics.jsonl


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------------------------- run dirs


def run_results_paths(run_dir: Path) -> tuple[Path, Path]:
    run_dir = Path(run_dir)
    return run_dir / "eval" / "base" / "results.json", run_dir / "eval" / "tuned" / "results.json"


def run_method(run_dir: Path) -> str | None:
    """``method.name`` of the run's config.yaml (read through the experiment-config loader), or None."""
    from sift_llm.config import RESOLVED_NAME, load_config

    config = Path(run_dir) / RESOLVED_NAME
    if not config.is_file():
        return None
    return load_config(config).method.name


def load_run(run_dir: Path) -> tuple[dict, dict]:
    """(base results, tuned results) of an evaluated run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    base_path, tuned_path = run_results_paths(run_dir)
    if not tuned_path.is_file():
        raise UserError(f"{run_dir} has no eval results ({tuned_path} is missing); run `sift-llm eval {run_dir}` first")
    if not base_path.is_file():
        raise UserError(f"{run_dir} has no base-model eval results ({base_path} is missing); "
                        f"run `sift-llm eval {run_dir}` first")
    return read_results(base_path), read_results(tuned_path)


def training_records(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """(metrics.jsonl records, a note when there are none to draw)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return [], f"No training metrics: {path} does not exist."
    records = read_metrics(path)
    if not any("loss" in r or "eval_loss" in r for r in records):
        return records, f"{path} holds no loss values."
    return records, None
