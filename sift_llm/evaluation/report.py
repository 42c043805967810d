"""Reports from evaluation results: report.md, eval_summary.json, samples.json and the PNG charts.

A report compares *columns* (base, tuned, or several runs) over *rows*. It leads with the held-out
response likelihood (what instruction tuning moves first), then the benchmark tasks (a task or group,
then its category groups; leaf tasks such as the 57 MMLU subjects go into a collapsed detail table),
each change against the model's base with its standard error and whether it is within noise; then the
generation samples, how everything was evaluated, and the training curves. Every output is written
through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation import charts, mmlu
from sift_llm.evaluation.heldout import GENERATION, LIKELIHOOD, TASKS
from sift_llm.evaluation.results import (
    Delta,
    Row,
    Score,
    delta,
    generations,
    load_run,
    merge_rows,
    run_method,
    score,
    series,
    training_records,
)
from sift_llm.fsio import atomic_write_json, atomic_write_text

ACCURACY_PNG = "eval_accuracy.png"
CURVES_PNG = "training_curves.png"
SUMMARY_JSON = "eval_summary.json"  # the table as data, for scripts
SAMPLES_JSON = "samples.json"


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


def _compared(columns: list[Column]) -> list[Column]:
    return [c for c in columns if c.reference is not None]


def _delta(column: Column, name: str, metric: str | None = None) -> Delta | None:
    return delta(column.results, column.reference.results, name, metric) if column.reference is not None else None


def _rows(columns: list[Column]) -> tuple[list[Row], list[Row]]:
    """(summary, detail) rows of the benchmark tasks (the held-out tasks have their own sections)."""
    return merge_rows([c.results for c in columns], skip=TASKS)


def _has_any(columns: list[Column], name: str) -> bool:
    return any(name in c.results.get("results", {}) for c in columns)


# ------------------------------------------------------------------------------------------ cells


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _cell(s: Score | None) -> str:
    if s is None or s.value is None:
        return "–"
    return _pct(s.value) + (f" ± {100 * s.stderr:.2f}" if s.stderr is not None else "")


def _delta_cell(d: Delta | None) -> str:
    return "–" if d is None else f"{100 * d.value:+.2f}"


def _noise_cell(d: Delta | None, scale: float = 100.0, digits: int = 2) -> str:
    """The standard error of Δ and the verdict: within noise when |Δ| < 2 se."""
    if d is None:
        return "–"
    if d.value == 0:
        return "no change"
    if d.stderr is None:
        return "se unknown"
    ratio = f"{abs(d.value) / d.stderr:.1f} se" if d.stderr > 0 else "se 0"
    verdict = "within noise" if d.within_noise else f"**beyond noise** ({ratio})"
    return f"±{scale * d.stderr:.{digits}f}, {verdict}"


def _n(columns: list[Column], name: str) -> str:
    counts = {s.n for c in columns if (s := score(c.results, name)) is not None and s.n is not None}
    if not counts:
        return "–"
    return str(counts.pop()) if len(counts) == 1 else "/".join(str(n) for n in sorted(counts))


# ------------------------------------------------------------------------------- held-out likelihood


def _tokens(columns: list[Column]) -> int | None:
    for c in columns:
        tokens = c.results.get("results", {}).get(LIKELIHOOD, {}).get("tokens")
        if isinstance(tokens, int):
            return tokens
    return None


def _value_cell(s: Score | None, digits: int) -> str:
    if s is None or s.value is None:
        return "–"
    return f"{s.value:.{digits}f}" + (f" ± {s.stderr:.{digits}f}" if s.stderr is not None else "")


def likelihood_table(columns: list[Column]) -> list[str]:
    """The first table: mean NLL per held-out response token and perplexity, each column and each change."""
    if not _has_any(columns, LIKELIHOOD):
        return []
    compared = _compared(columns)
    n, tokens = _n(columns, LIKELIHOOD), _tokens(columns)
    header = ["Held-out responses", "N"] + [c.label for c in columns]
    header += [f"Δ {c.label}" for c in compared] + [f"Δ {c.label} vs noise" for c in compared]
    lines = ["## Held-out response likelihood", "",
             f"Mean negative log-likelihood of the reference response tokens (nats per token; lower is better) "
             f"over the run's {n} held-out examples" + (f" ({tokens:,} response tokens)" if tokens else "")
             + ": the prompt is the context and the dataset's own response tokens (with EOS) the continuation, "
             f"scored by lm-eval (task `{LIKELIHOOD}`). It is the quantity the trainer logs as held-out loss "
             "(which may cover fewer examples: `train.eval_batches` micro-batches per rank), here over every "
             "held-out example. ± is one standard error; Δ is tuned − base, paired over the same responses.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for metric, label, digits in (("nll", "**NLL per token**", 4), ("token_perplexity", "perplexity", 3)):
        cells = [label, n] + [_value_cell(score(c.results, LIKELIHOOD, metric), digits) for c in columns]
        deltas = [_delta(c, LIKELIHOOD, metric) for c in compared]
        cells += ["–" if d is None else f"{d.value:+.{digits}f}" for d in deltas]
        cells += [_noise_cell(d, 1.0, digits) if metric == "nll" else "" for d in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = sorted({c.info.get("heldout_skipped") for c in columns if c.info.get("heldout_skipped")})
    lines += [f"- Not measured for some columns: {s}" for s in skipped]
    return lines + [""]


# ----------------------------------------------------------------------------------- benchmark tables


def _table(columns: list[Column], rows: list[Row], label_header: str) -> list[str]:
    compared = _compared(columns)
    header = [label_header, "N"] + [f"{c.label} (%)" for c in columns] + [f"Δ {c.label} (pp)" for c in compared]
    header += [f"Δ {c.label} vs noise (pp)" for c in compared]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        label = f"**{row.label}**" if row.level == 0 else row.label
        deltas = [_delta(c, row.name) for c in compared]
        cells = [label, _n(columns, row.name)] + [_cell(score(c.results, row.name)) for c in columns]
        cells += [_delta_cell(d) for d in deltas] + [_noise_cell(d) for d in deltas]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _limit_text(columns: list[Column], top: Row) -> str:
    limits = {(c.info.get("eval_config") or {}).get("limit") for c in columns}
    limit = limits.pop() if len(limits) == 1 else None
    unit = "MMLU subject" if top.name == mmlu.GROUP else "task"
    return f" ({limit} per {unit})" if limit is not None else ""


def sample_size_line(columns: list[Column], summary: list[Row]) -> list[str]:
    """One line: what the benchmark sample can show (changes beyond 2 se of Δ) and what it cannot."""
    compared = _compared(columns)
    top = next((r for r in summary if r.level == 0), None)
    if not compared or top is None:
        return []
    thresholds = [2 * 100 * d.resolution for c in compared if (d := _delta(c, top.name)) and d.resolution]
    if not thresholds:
        return []
    cats = [r for r in summary if r.level == 1]
    cat_part = ""
    if cats:
        cat_se = [2 * 100 * d.resolution for c in compared for r in cats if (d := _delta(c, r.name)) and d.resolution]
        counts = [s.n for r in cats if (s := score(compared[0].results, r.name)) and s.n]
        if cat_se and counts:
            cat_part = (f", nor a change within one category (about ±{min(cat_se):.1f} to ±{max(cat_se):.1f} pp "
                        f"at {min(counts)}-{max(counts)} questions each)")
    low, high = min(thresholds), max(thresholds)
    span = f"±{low:.1f} pp" if f"{low:.1f}" == f"{high:.1f}" else f"±{low:.1f} to ±{high:.1f} pp"
    n = _n(columns, top.name)
    return [f"- **Sample size:** {n} questions{_limit_text(columns, top)} can show an overall accuracy change larger "
            f"than about {span} (2 standard errors of Δ); they cannot show a smaller one{cat_part}.", ""]


# ------------------------------------------------------------------------------------------ samples


_ALPACA = re.compile(r"### Instruction:\n(?P<instruction>.*?)\n\n(?:### Input:\n(?P<input>.*?)\n\n)?### Response:",
                     re.DOTALL)


def instruction_text(prompt: str) -> str:
    """The instruction (and input) of an Alpaca prompt; any other prompt as it is."""
    match = _ALPACA.search(prompt)
    if not match:
        return prompt.strip()
    text = match["instruction"].strip()
    return text + (f"\n\nInput: {match['input'].strip()}" if match["input"] else "")


def _html_cell(text: str) -> str:
    text = html.escape(text.strip()) or "<i>(empty)</i>"
    return text.replace("|", "&#124;").replace("\n", "<br>")


def sample_records(columns: list[Column]) -> list[dict[str, Any]]:
    """Per held-out prompt: instruction, reference and each column's greedy response."""
    by_index: dict[Any, dict[str, Any]] = {}
    for column in columns:
        for g in generations(column.results):
            entry = by_index.setdefault(g.get("index"), {
                "index": g.get("index"), "instruction": instruction_text(g.get("prompt", "")),
                "prompt": g.get("prompt", ""), "reference": g.get("reference", ""), "responses": {}})
            entry["responses"][column.label] = g.get("response", "")
    return [by_index[k] for k in sorted(by_index, key=lambda k: (str(type(k)), k))]


def samples_section(columns: list[Column], records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    tokens = {c.info.get("heldout", {}).get("max_new_tokens") for c in columns if c.info.get("heldout")}
    bound = f"at most {tokens.pop()} new tokens" if len(tokens) == 1 else "a bounded number of new tokens"
    labels = [c.label for c in columns if any(c.label in r["responses"] for r in records)]
    out = ["## Samples", "",
           f"Greedy responses to the first {len(records)} held-out instructions ({bound}, stopping at EOS), "
           f"side by side; also in `{SAMPLES_JSON}`.", ""]
    for i, record in enumerate(records, 1):
        first, _, rest = record["instruction"].partition("\n")
        out += [f"**{i}. {html.escape(first[:120])}{'…' if len(first) > 120 else ''}**", ""]
        if len(first) > 120 or rest.strip():
            shown = record["instruction"] if len(first) > 120 else rest.strip()
            out += ["> " + html.escape(shown).replace("\n", "\n> "), ""]
        out += ["| " + " | ".join(labels) + " |", "|" + "|".join(["---"] * len(labels)) + "|",
                "| " + " | ".join(_html_cell(record["responses"].get(label, "")) for label in labels) + " |", "",
                f"<details><summary>reference response</summary>\n\n{_html_cell(record['reference'])}\n\n</details>",
                ""]
    return out


# ------------------------------------------------------------------------------------------ provenance


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
    paired = {d.paired for c in _compared(columns) for r in _rows(columns)[0] if (d := _delta(c, r.name))}
    if paired:
        how = ("paired over the same questions (per-question records)" if paired == {True} else
               "from the two standard errors as if independent (no per-question records)" if paired == {False}
               else "paired where per-question records exist, else from the two standard errors")
        lines.append(f"- Standard error of Δ: {how}; a Δ within 2 of them is marked within noise.")
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
        if info.get("heldout_skipped"):
            extra.append("held-out tasks skipped")
        if info.get("quantization"):  # a 4-bit base: say which of the 4-bit model and the merged one was scored
            extra.append(f"scored: {info['scored']}")
        lines.append(f"- **{column.label}**: `{what}` ({', '.join(extra)})" + "".join(f"; {n}" for n in column.notes))
    return lines


def held_out_table(training: list[tuple[str, list[dict[str, Any]]]]) -> list[str]:
    """First and last held-out loss of each run, as the trainer logged them."""
    rows = []
    for label, records in training:
        steps, losses = series(records, "eval_loss")
        if steps:
            change = losses[-1] - losses[0]
            rows.append(f"| {label} | {losses[0]:.4f} (step {steps[0]}) | {losses[-1]:.4f} (step {steps[-1]}) "
                        f"| {change:+.4f} |")
    if not rows:
        return []
    return ["| Run | first held-out loss | last held-out loss | change |", "|---|---:|---:|---:|", *rows, ""]


# ------------------------------------------------------------------------------------------ the report


def render_markdown(
    columns: list[Column],
    *,
    title: str,
    chart: str | None,
    curves: str | None,
    curve_note: str | None = None,
    training: list[tuple[str, list[dict[str, Any]]]] | None = None,
    samples: list[dict[str, Any]] | None = None,
) -> str:
    summary, details = _rows(columns)
    if not summary and not _has_any(columns, LIKELIHOOD):
        raise UserError("the results hold no tasks to report")
    out = [f"# {title}", ""]
    out += likelihood_table(columns)
    if chart:
        out += [f"![accuracy per category]({chart})", ""]
    if summary:
        refs = sorted({c.reference.label for c in columns if c.reference is not None})
        against = f" against {', '.join(refs)}" if len(refs) == 1 else " against each model's base"
        out += ["## Benchmarks", "",
                "Accuracy in % ± its standard error"
                + (f"; Δ in percentage points{against}, with the standard error of Δ and whether "
                   "|Δ| < 2 of them (within noise)." if refs else "."), ""]
        out += _table(columns, summary, "Task")
        out.append("")
        out += sample_size_line(columns, summary)
    if details:
        out += ["<details><summary>Per-task results</summary>", ""]
        out += _table(columns, details, "Task")
        out += ["", "</details>", ""]
    out += samples_section(columns, samples or [])
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
    summary, details = _rows(columns)
    likelihood = [Row(LIKELIHOOD, "held-out responses", 0)] if _has_any(columns, LIKELIHOOD) else []
    rows = []
    for row in likelihood + summary + details:
        entry: dict[str, Any] = {"task": row.name, "label": row.label, "level": row.level, "scores": {}}
        for column in columns:
            s = score(column.results, row.name)
            entry["scores"][column.label] = None if s is None else {
                "metric": s.metric, "value": s.value, "stderr": s.stderr, "n": s.n}
            d = _delta(column, row.name)
            if d is not None:
                entry.setdefault("delta", {})[column.label] = d.value
                entry.setdefault("delta_stderr", {})[column.label] = d.stderr
                entry.setdefault("within_noise", {})[column.label] = d.within_noise
        rows.append(entry)
    return {"columns": [{"label": c.label, "source": c.source,
                         "reference": c.reference.label if c.reference is not None else None,
                         **{k: c.info.get(k) for k in ("model", "adapter", "adapter_kind", "backend", "cached",
                                                       "fingerprint")}} for c in columns],
            "rows": rows}


def _harness_points(columns: list[Column], training: list[tuple[str, list[dict[str, Any]]]]) -> dict:
    """Per run label: the harness's held-out NLL of its base (at step 0) and of the tuned model (last step)."""
    points = {}
    last_step = {label: max((r["step"] for r in records if "step" in r), default=None) for label, records in training}
    for column in _compared(columns):
        tuned, base = score(column.results, LIKELIHOOD, "nll"), score(column.reference.results, LIKELIHOOD, "nll")
        step = last_step.get(column.label)
        if tuned and base and tuned.value is not None and base.value is not None and step is not None:
            points[column.label] = [(0, base.value), (step, tuned.value)]
    return points


def write_report(
    columns: list[Column],
    output_dir: str | os.PathLike,
    *,
    title: str,
    training: list[tuple[str, list[dict[str, Any]]]] | None = None,
    curve_note: str | None = None,
) -> Path:
    """report.md, the change (or score) chart, training curves (when there are metrics), eval_summary.json
    and samples.json (when there are generation samples)."""
    output_dir = Path(output_dir)
    summary, _ = _rows(columns)
    if not summary and not _has_any(columns, LIKELIHOOD):
        raise UserError("the results hold no tasks to report")
    colors = {c.label: f"C{i % 10}" for i, c in enumerate(columns)}  # a run keeps its colour in every chart
    compared = _compared(columns)
    if compared:
        chart = charts.plot_deltas(
            [(c.label, colors[c.label], _delta(c, LIKELIHOOD, "nll")) for c in compared],
            summary, [(c.label, colors[c.label], [_delta(c, r.name) for r in summary]) for c in compared],
            output_dir / ACCURACY_PNG, title)
    else:
        chart = charts.plot_scores(columns, summary, output_dir / ACCURACY_PNG, title)
    curves = charts.plot_training_curves(training or [], output_dir / CURVES_PNG, colors,
                                         _harness_points(columns, training or []))
    if curves is None:
        with contextlib.suppress(FileNotFoundError):
            (output_dir / CURVES_PNG).unlink()  # a stale chart from an earlier report
    samples = sample_records(columns)
    text = render_markdown(columns, title=title, chart=chart.name, curves=curves.name if curves else None,
                           curve_note=curve_note, training=training, samples=samples)
    atomic_write_json(output_dir / SUMMARY_JSON, summary_json(columns))
    if samples:
        atomic_write_json(output_dir / SAMPLES_JSON, {"task": GENERATION, "samples": samples})
    else:
        with contextlib.suppress(FileNotFoundError):
            (output_dir / SAMPLES_JSON).unlink()
    return atomic_write_text(output_dir / "report.md", text)


# ---------------------------------------------------------------------------------------- run dirs


def write_run_report(run_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> Path:
    """Base vs tuned report of one run (RUN_DIR/eval/{base,tuned}/results.json) into RUN_DIR (default)."""
    run_dir = Path(run_dir)
    base, tuned = load_run(run_dir)
    method = run_method(run_dir) or "tuned"
    base_column = Column("base", base, str(run_dir / "eval" / "base"))
    columns = [base_column, Column(method, tuned, str(run_dir / "eval" / "tuned"), reference=base_column)]
    records, note = training_records(run_dir)
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
    loaded = [(run, *load_run(run)) for run in runs]
    names = [run_method(run) or run.name for run in runs]
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
        records, note = training_records(run)
        training.append((label, records))
        if note:
            notes.append(f"{label}: {note}")
    if len(bases) > 1:
        notes.append("The runs have different base models (or base evaluations); each Δ is against its own base.")
    title = "Comparison: " + ", ".join(labels)
    return write_report(columns, output_dir, title=title, training=training,
                        curve_note="\n".join(f"- {n}" for n in notes) or None)
