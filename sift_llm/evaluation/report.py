"""Reports from lm-eval results: a markdown table (overall and per category), bar charts, training curves.

A report compares *columns* (base, tuned, or several runs) over *rows* (a task or group, then its
category groups); leaf tasks (e.g. the 57 MMLU subjects) go into a collapsed detail table. Every output
is written through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.fsio import atomic_write_json, atomic_write_text, read_jsonl_objects
from sift_llm.plotting import pyplot, save_figure

PREFERRED_METRICS = ("acc", "acc_norm", "exact_match", "f1", "mcc", "word_perplexity")
ACCURACY_PNG = "eval_accuracy.png"
CURVES_PNG = "training_curves.png"
SUMMARY_JSON = "eval_summary.json"  # the table as data, for scripts


# ---------------------------------------------------------------------------------------- reading


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


@dataclass
class Column:
    label: str
    results: dict[str, Any]
    source: str = ""
    notes: list[str] = field(default_factory=list)
    reference: Column | None = None  # Δ columns are against this one (the model's base)

    @property
    def info(self) -> dict[str, Any]:
        return self.results.get("sift_llm") or {}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def score(results: dict[str, Any], name: str) -> Score | None:
    """The headline metric of task/group ``name``: acc when there is one, else the first metric."""
    entry = results.get("results", {}).get(name)
    if not isinstance(entry, dict):
        return None
    metrics = {k: v for k, v in entry.items() if "," in k and "_stderr," not in k and _number(v) is not None}
    if not metrics:
        return None
    chosen = None
    for metric in PREFERRED_METRICS:
        chosen = next((k for k in metrics if k.split(",")[0] == metric), None)
        if chosen:
            break
    chosen = chosen or sorted(metrics)[0]
    base, _, filt = chosen.partition(",")
    n = entry.get("sample_len")
    if n is None:
        n = (results.get("n-samples", {}).get(name) or {}).get("effective")
    return Score(
        value=_number(metrics[chosen]),
        stderr=_number(entry.get(f"{base}_stderr,{filt}")),
        metric=base,
        n=int(n) if isinstance(n, (int, float)) else None,
    )


def _strip_prefix(name: str, parent: str | None) -> str:
    if parent and name.startswith(parent + "_"):
        return name[len(parent) + 1 :]
    return name


def layout(results: dict[str, Any]) -> tuple[list[Row], list[Row]]:
    """(summary rows, detail rows) from lm-eval's task tree.

    Top-level entries (not a member of any group) come first, each followed by its member groups (the
    MMLU categories). Leaf tasks under a group go to the detail rows.
    """
    entries = list(results.get("results", {}))
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


def _merge_rows(columns: list[Column]) -> tuple[list[Row], list[Row]]:
    summary: dict[str, Row] = {}
    details: dict[str, Row] = {}
    for column in columns:
        s, d = layout(column.results)
        for row in s:
            summary.setdefault(row.name, row)
        for row in d:
            details.setdefault(row.name, row)
    return list(summary.values()), [r for r in details.values() if r.name not in summary]


# ---------------------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a training run's metrics.jsonl; a malformed line raises UserError naming file:line.

    A line with ``loss`` or ``eval_loss`` needs an integer ``step``; other keys are free (lines without any
    of the three, e.g. events, are kept and ignored by the charts).
    """
    records = []
    for where, record in read_jsonl_objects(path):
        step = record.get("step")
        has_loss = "loss" in record or "eval_loss" in record
        if (has_loss or "step" in record) and (isinstance(step, bool) or not isinstance(step, int)):
            raise UserError(f"{where}: 'step' must be an integer, got {step!r}")
        for key in ("loss", "eval_loss"):
            if key in record and (isinstance(record[key], bool) or not isinstance(record[key], (int, float))):
                raise UserError(f"{where}: {key!r} must be a number, got {record[key]!r}")
        records.append(record)
    return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


# ---------------------------------------------------------------------------------------- writing


def plot_scores(columns: list[Column], rows: list[Row], path: Path, title: str) -> Path:
    """Grouped bars: one group per summary row, one bar (with a stderr whisker) per column."""
    plt = pyplot()
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(rows) * max(1, len(columns)) / 2 + 3), 4.5))
    try:
        for i, column in enumerate(columns):
            values, errors = [], []
            for row in rows:
                s = score(column.results, row.name)
                values.append(100 * s.value if s and s.value is not None else float("nan"))
                errors.append(100 * s.stderr if s and s.stderr is not None else 0.0)
            xs = [j + (i - (len(columns) - 1) / 2) * width for j in range(len(rows))]
            bars = ax.bar(xs, values, width, yerr=errors, capsize=3, label=column.label, color=f"C{i % 10}")
            for bar, value, error in zip(bars, values, errors):
                if not math.isnan(value):
                    ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value + error),
                                ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.label.replace("_", " ") for r in rows], rotation=20 if len(rows) > 4 else 0)
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_training_curves(
    runs: list[tuple[str, list[dict[str, Any]]]], path: Path, colors: dict[str, str] | None = None
) -> Path | None:
    """Training loss (solid) and held-out loss (dashed, dots) against step, one colour per run."""
    colors = colors or {}
    runs = [(label, records) for label, records in runs
            if any("loss" in r or "eval_loss" in r for r in records)]
    if not runs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        for i, (label, records) in enumerate(runs):
            color = colors.get(label, f"C{i % 10}")
            prefix = f"{label}: " if len(runs) > 1 else ""
            steps, losses = _series(records, "loss")
            if steps:
                ax.plot(steps, losses, color=color, linewidth=1.2, label=f"{prefix}train loss")
            steps, losses = _series(records, "eval_loss")
            if steps:
                ax.plot(steps, losses, color=color, linestyle="--", marker="o", markersize=3,
                        label=f"{prefix}held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Training curves")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _cell(s: Score | None) -> str:
    if s is None or s.value is None:
        return "–"
    return _pct(s.value) + (f" ± {100 * s.stderr:.2f}" if s.stderr is not None else "")


def _delta(s: Score | None, ref: Score | None) -> str:
    if s is None or ref is None or s.value is None or ref.value is None:
        return "–"
    return f"{100 * (s.value - ref.value):+.2f}"


def _n(columns: list[Column], name: str) -> str:
    counts = {s.n for c in columns if (s := score(c.results, name)) is not None and s.n is not None}
    if not counts:
        return "–"
    return str(counts.pop()) if len(counts) == 1 else "/".join(str(n) for n in sorted(counts))


def _table(columns: list[Column], rows: list[Row], label_header: str) -> list[str]:
    compared = [c for c in columns if c.reference is not None]
    header = [label_header, "N"] + [f"{c.label} (%)" for c in columns] + [f"Δ {c.label} (pp)" for c in compared]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        label = f"**{row.label}**" if row.level == 0 else row.label
        cells = [label, _n(columns, row.name)] + [_cell(score(c.results, row.name)) for c in columns]
        cells += [_delta(score(c.results, row.name), score(c.reference.results, row.name)) for c in compared]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _setting_lines(columns: list[Column]) -> list[str]:
    lines, seen = [], {}
    for column in columns:
        cfg = column.info.get("eval_config") or {}
        key = json.dumps({k: cfg.get(k) for k in ("tasks", "num_fewshot", "limit", "apply_chat_template")},
                         sort_keys=True)
        seen.setdefault(key, []).append(column.label)
    for key, labels in seen.items():
        cfg = json.loads(key)
        limit = cfg["limit"]
        text = (f"tasks {', '.join(cfg['tasks'] or ['?'])}; {cfg['num_fewshot']}-shot; "
                f"limit {'none (full)' if limit is None else f'{limit} per task'}"
                + ("; chat template" if cfg["apply_chat_template"] else ""))
        lines.append(f"- Settings{' (' + ', '.join(labels) + ')' if len(seen) > 1 else ''}: {text}")
    if len(seen) > 1:
        lines.append("- **Warning:** the columns were evaluated with different settings; compare with care.")
    if any(json.loads(k)["limit"] is not None for k in seen):
        lines.append("- **Note:** a per-task limit evaluates a subset; these numbers are not comparable with "
                     "full-benchmark results.")
    return lines


def _source_lines(columns: list[Column]) -> list[str]:
    lines = []
    for column in columns:
        info = column.info
        what = info.get("model", "?")
        if info.get("adapter"):
            what += f" + {info.get('adapter_kind')} adapter {info['adapter']}"
        extra = [f"backend {info.get('backend', '?')}", f"{info.get('device', '?')}/{info.get('dtype', '?')}"]
        if info.get("cached"):
            extra.append(f"cached results (fingerprint {info.get('fingerprint', '?')})")
        elif info.get("elapsed_s") is not None:
            extra.append(f"{info['elapsed_s']:.0f} s")
        lines.append(f"- **{column.label}**: `{what}` ({', '.join(extra)})" + "".join(f"; {n}" for n in column.notes))
    return lines


def held_out_table(training: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """First and last held-out loss of each run: the number that moves when a small-sample MMLU does not."""
    rows = []
    for label, records in training:
        steps, losses = _series(records, "eval_loss")
        if steps:
            change = losses[-1] - losses[0]
            rows.append(f"| {label} | {losses[0]:.4f} (step {steps[0]}) | {losses[-1]:.4f} (step {steps[-1]}) "
                        f"| {change:+.4f} |")
    if not rows:
        return []
    return ["| Run | first held-out loss | last held-out loss | change |", "|---|---:|---:|---:|", *rows, ""]


def render_markdown(
    columns: list[Column],
    *,
    title: str,
    chart: str | None,
    curves: str | None,
    curve_note: str | None = None,
    training: list[tuple[str, list[dict[str, Any]]]] | None = None,
) -> str:
    summary, details = _merge_rows(columns)
    if not summary:
        raise UserError("the results hold no tasks to report")
    out = [f"# {title}", ""]
    refs = sorted({c.reference.label for c in columns if c.reference is not None})
    against = f" against {', '.join(refs)}" if len(refs) == 1 else " against each model's base"
    out += ["Accuracy in % ± its standard error" + (f"; Δ in percentage points{against}." if refs else "."), ""]
    out += _table(columns, summary, "Task")
    out.append("")
    if chart:
        out += [f"![accuracy per category]({chart})", ""]
    if details:
        out += ["<details><summary>Per-task results</summary>", ""]
        out += _table(columns, details, "Task")
        out += ["", "</details>", ""]
    out += ["## Evaluation", ""] + _source_lines(columns) + _setting_lines(columns)
    versions = sorted({c.info.get("lm_eval_version") or c.results.get("lm_eval_version") or "?" for c in columns})
    out += [f"- lm-eval {', '.join(versions)}", ""]
    out += ["## Training", ""]
    out += held_out_table(training or [])
    if curves:
        out += [f"![training curves]({curves})", ""]
    out += [curve_note or ("" if curves else "No training metrics (metrics.jsonl) found."), ""]
    return "\n".join(out).rstrip() + "\n"


def summary_json(columns: list[Column]) -> dict[str, Any]:
    summary, details = _merge_rows(columns)
    rows = []
    for row in summary + details:
        entry = {"task": row.name, "label": row.label, "level": row.level, "scores": {}}
        for column in columns:
            s = score(column.results, row.name)
            entry["scores"][column.label] = None if s is None else {
                "metric": s.metric, "value": s.value, "stderr": s.stderr, "n": s.n}
            if column.reference is not None:
                ref = score(column.reference.results, row.name)
                if s is not None and ref is not None and s.value is not None and ref.value is not None:
                    entry.setdefault("delta", {})[column.label] = s.value - ref.value
        rows.append(entry)
    return {"columns": [{"label": c.label, "source": c.source,
                         "reference": c.reference.label if c.reference is not None else None,
                         **{k: c.info.get(k) for k in ("model", "adapter", "adapter_kind", "backend", "cached",
                                                       "fingerprint")}} for c in columns],
            "rows": rows}


def write_report(
    columns: list[Column],
    output_dir: str | os.PathLike,
    *,
    title: str,
    training: list[tuple[str, list[dict[str, Any]]]] | None = None,
    curve_note: str | None = None,
) -> Path:
    """report.md, the accuracy chart, training curves (when there are metrics) and eval_summary.json."""
    output_dir = Path(output_dir)
    summary, _ = _merge_rows(columns)
    if not summary:
        raise UserError("the results hold no tasks to report")
    chart = plot_scores(columns, summary, output_dir / ACCURACY_PNG, title)
    colors = {c.label: f"C{i % 10}" for i, c in enumerate(columns)}  # a run keeps its bar colour
    curves = plot_training_curves(training or [], output_dir / CURVES_PNG, colors)
    if curves is None:
        with contextlib.suppress(FileNotFoundError):
            (output_dir / CURVES_PNG).unlink()  # a stale chart from an earlier report
    text = render_markdown(columns, title=title, chart=chart.name,
                           curves=curves.name if curves else None, curve_note=curve_note, training=training)
    atomic_write_json(output_dir / SUMMARY_JSON, summary_json(columns))
    return atomic_write_text(output_dir / "report.md", text)


# ---------------------------------------------------------------------------------------- run dirs


def _run_method(run_dir: Path) -> str | None:
    import yaml

    config = run_dir / "config.yaml"
    if not config.is_file():
        return None
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{config}: not valid YAML ({err})") from None
    method = data.get("method") if isinstance(data, dict) else None
    name = method.get("name") if isinstance(method, dict) else None
    return str(name) if name else None


def run_results_paths(run_dir: Path) -> tuple[Path, Path]:
    return run_dir / "eval" / "base" / "results.json", run_dir / "eval" / "tuned" / "results.json"


def _load_run(run_dir: Path) -> tuple[dict, dict]:
    from sift_llm.evaluation.harness import read_results

    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    base_path, tuned_path = run_results_paths(run_dir)
    if not tuned_path.is_file():
        raise UserError(f"{run_dir} has no eval results ({tuned_path} is missing); run `sift-llm eval {run_dir}` first")
    if not base_path.is_file():
        raise UserError(f"{run_dir} has no base-model eval results ({base_path} is missing); "
                        f"run `sift-llm eval {run_dir}` first")
    return read_results(base_path), read_results(tuned_path)


def _training(run_dir: Path) -> tuple[list[dict[str, Any]], str | None]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], f"No training metrics: {path} does not exist."
    records = read_metrics(path)
    if not any("loss" in r or "eval_loss" in r for r in records):
        return records, f"{path} holds no loss values."
    return records, None


def write_run_report(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Base vs tuned report of one run (RUN_DIR/eval/{base,tuned}/results.json) into RUN_DIR (default)."""
    run_dir = Path(run_dir)
    base, tuned = _load_run(run_dir)
    method = _run_method(run_dir) or "tuned"
    base_column = Column("base", base, str(run_dir / "eval" / "base"))
    columns = [base_column, Column(method, tuned, str(run_dir / "eval" / "tuned"), reference=base_column)]
    records, note = _training(run_dir)
    return write_report(columns, output_dir or run_dir, title=f"{method} vs base: {run_dir.name}",
                        training=[(method, records)], curve_note=note)


def _same_base(a: dict, b: dict) -> bool:
    fa, fb = (a.get("sift_llm") or {}).get("fingerprint"), (b.get("sift_llm") or {}).get("fingerprint")
    if fa and fb:
        return fa == fb
    return a.get("results") == b.get("results")


def compare_runs(run_dirs: list[str | os.PathLike], output_dir: str | os.PathLike) -> Path:
    """One table and one chart over several runs (e.g. SIFT, LoRA, full FT) and their base model."""
    if not run_dirs:
        raise UserError("no run directories given")
    runs = [Path(r) for r in run_dirs]
    loaded = [(run, *_load_run(run)) for run in runs]
    names = [_run_method(run) or run.name for run in runs]
    labels = [name if names.count(name) == 1 else f"{name} ({run.name})" for name, run in zip(names, runs)]
    if len(set(labels)) != len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    bases: list[tuple[dict, list[str]]] = []
    base_of: list[int] = []
    for (run, base, _), label in zip(loaded, labels):
        for i, (known, users) in enumerate(bases):
            if _same_base(known, base):
                users.append(label)
                base_of.append(i)
                break
        else:
            base_of.append(len(bases))
            bases.append((base, [label]))
    columns = []
    for i, (base, users) in enumerate(bases):
        label = "base" if len(bases) == 1 else f"base {i + 1}"
        note = [] if len(bases) == 1 else [f"base of {', '.join(users)}"]
        columns.append(Column(label, base, notes=note))
    base_columns = list(columns)
    for (run, _, tuned), label, i in zip(loaded, labels, base_of):
        columns.append(Column(label, tuned, str(run), reference=base_columns[i]))
    notes, training = [], []
    for run, label in zip(runs, labels):
        records, note = _training(run)
        training.append((label, records))
        if note:
            notes.append(f"{label}: {note}")
    if len(bases) > 1:
        notes.append("The runs have different base models (or base evaluations); each Δ is against its own base.")
    title = "Comparison: " + ", ".join(labels)
    return write_report(columns, output_dir, title=title, training=training,
                        curve_note="\n".join(f"- {n}" for n in notes) or None)
