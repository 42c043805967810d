"""The held-out tasks: lm-eval tasks built from a run's own validation split.

* ``heldout_likelihood`` (output_type loglikelihood): each held-out example's prompt is the context and
  its reference response the continuation. The metric ``nll`` is the token-weighted mean negative
  log-likelihood of the response tokens (nats per token), ``token_perplexity`` its exp: the quantity the
  trainer logs as ``eval_loss``. The scored tokens are the prepared dataset's own (``input_ids`` and
  ``labels`` travel in each doc and :class:`sift_llm.evaluation.lm.DatasetTokensLM` scores exactly them),
  so the prompt/response boundary is the data stage's, not a re-tokenisation of strings. A chat example
  is scored on every assistant span (each span's context is everything before it).
* ``heldout_generation`` (output_type generate_until): the first N held-out prompts, greedy, stopping at
  EOS or after ``eval.max_new_tokens``; the report shows the base and tuned responses side by side.

The task files under ``eval/heldout/`` are generated from :func:`render_task_files`. Their data hook,
:func:`load_docs`, reads the dataset directory and tokenizer named in the task metadata
(:meth:`HeldOutSource.metadata`), which ``sift-llm eval RUN_DIR`` fills from the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_llm import resources
from sift_llm.errors import UserError

LIKELIHOOD = "heldout_likelihood"
GENERATION = "heldout_generation"
TASKS = (LIKELIHOOD, GENERATION)
GROUP = "heldout"
TASK_VERSION = 1
COMMITTED_TASK_DIR = resources.shipped("eval") / GROUP  # <repo>/eval/heldout, shipped with the package
IGNORE_INDEX = -100


@dataclass
class HeldOutSource:
    """Where a run's held-out split lives and what to evaluate on it."""

    dataset: Path  # a prepared-data directory (holds dataset/ with a validation split)
    tokenizer: Path  # the tokenizer the data stage used (decodes the prompts and references)
    fingerprint: str  # the data stage's fingerprint of that dataset
    likelihood: bool = True
    samples: int = 5
    max_new_tokens: int = 128

    @property
    def tasks(self) -> list[str]:
        return ([LIKELIHOOD] if self.likelihood else []) + ([GENERATION] if self.samples > 0 else [])

    def metadata(self) -> dict[str, Any]:
        return {"heldout_dataset": str(self.dataset), "heldout_tokenizer": str(self.tokenizer),
                "heldout_samples": self.samples}

    def identity(self) -> dict[str, Any]:
        """What a cached base result depends on (for the fingerprint)."""
        return {"data_fingerprint": self.fingerprint, "tasks": self.tasks, "samples": self.samples,
                "max_new_tokens": self.max_new_tokens, "task_version": TASK_VERSION}


def source_for(dataset_dir: str | os.PathLike, *, likelihood: bool, samples: int, max_new_tokens: int,
               tokenizer: str | os.PathLike | None = None) -> HeldOutSource:
    """A HeldOutSource for a prepared-data directory, checked: it exists and has a validation split."""
    dataset_dir = Path(dataset_dir)
    from sift_llm.evaluation.results import read_json

    stamp = dataset_dir / "fingerprint.json"
    if not stamp.is_file():
        raise UserError(f"{dataset_dir} is not a prepared dataset ({stamp} is missing)")
    recorded = read_json(stamp)
    if not isinstance(recorded, dict) or not isinstance(recorded.get("fingerprint"), str):
        raise UserError(f"{stamp}: expected an object with a 'fingerprint' string")
    if not (dataset_dir / "dataset" / "validation").is_dir():
        raise UserError(f"{dataset_dir} has no validation split (data.validation_size is 0?), so there is "
                        "nothing held out to evaluate; set eval.heldout false and eval.samples 0")
    tokenizer = Path(tokenizer or recorded.get("tokenizer") or "")
    if not tokenizer.is_dir():
        raise UserError(f"{stamp}: the tokenizer directory {tokenizer} it names does not exist")
    return HeldOutSource(dataset_dir, tokenizer, recorded["fingerprint"], likelihood, samples, max_new_tokens)


# ------------------------------------------------------------------------------------- the documents


def label_spans(ids: list[int], labels: list[int], where: str = "example") -> list[tuple[int, int]]:
    """[start, end) runs of learned positions (labels != -100), position 0 excluded: the tokens the
    trainer's shifted loss scores. Each label must be its input token (as the data stage writes them)."""
    if len(ids) != len(labels):
        raise UserError(f"{where}: input_ids and labels differ in length ({len(ids)} vs {len(labels)})")
    spans: list[tuple[int, int]] = []
    start = None
    for j in range(1, len(ids) + 1):
        learned = j < len(ids) and labels[j] != IGNORE_INDEX
        if learned and labels[j] != ids[j]:
            raise UserError(f"{where}: label {labels[j]} at position {j} is not its input token {ids[j]}")
        if learned and start is None:
            start = j
        elif not learned and start is not None:
            spans.append((start, j))
            start = None
    return spans


def token_requests(ids: list[int], labels: list[int]) -> list[tuple[list[int], list[int]]]:
    """(context tokens, continuation tokens) per learned span: together they score exactly the labels."""
    return [(list(ids[:s]), list(ids[s:e])) for s, e in label_spans(ids, labels)]


def load_docs(part: str | None = None, heldout_dataset: str | None = None, heldout_tokenizer: str | None = None,
              heldout_samples: int = 5, **_: Any):
    """lm-eval ``custom_dataset`` hook: the run's held-out examples as a DatasetDict with a ``test`` split.

    ``part`` likelihood: every validation example, with its tokens; generation: the first
    ``heldout_samples`` prompts and their references as text.
    """
    import datasets
    from transformers import AutoTokenizer

    from sift_llm.data.stage import load_prepared

    if part not in ("likelihood", "generation"):
        raise UserError(f"the {GROUP} task files name part {part!r}; expected likelihood or generation")
    if not heldout_dataset or not heldout_tokenizer:
        raise UserError(f"the {GROUP} tasks need the run's dataset and tokenizer in their metadata "
                        "(heldout_dataset, heldout_tokenizer); `sift-llm eval RUN_DIR` passes them")
    try:
        validation = load_prepared(heldout_dataset)["validation"]
    except (FileNotFoundError, KeyError):
        raise UserError(f"{heldout_dataset} has no validation split to evaluate") from None
    tokenizer = AutoTokenizer.from_pretrained(heldout_tokenizer)
    rows = []
    count = len(validation) if part == "likelihood" else min(int(heldout_samples), len(validation))
    for index in range(count):
        example = validation[index]
        ids, labels = list(example["input_ids"]), list(example["labels"])
        spans = label_spans(ids, labels, f"{heldout_dataset} validation example {index}")
        if not spans:
            continue
        first_start, first_end = spans[0]
        prompt = tokenizer.decode(ids[:first_start], skip_special_tokens=False)
        reference = tokenizer.decode(ids[first_start:first_end], skip_special_tokens=True)
        if part == "likelihood":
            rows.append({"index": index, "input_ids": ids, "labels": labels, "prompt": prompt,
                         "response": tokenizer.decode(ids[first_start:first_end], skip_special_tokens=False),
                         "n_tokens": sum(e - s for s, e in spans)})
        else:
            rows.append({"index": index, "prompt": prompt, "reference": reference})
    if not rows:
        raise UserError(f"{heldout_dataset}: no validation example has a response token to score")
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


# -------------------------------------------------------------------------------------- the metrics


def process_likelihood(doc: dict, results: list) -> dict:
    """Per doc: (loglikelihood of the response tokens, their count) for the token-weighted metrics."""
    loglikelihood, _greedy = results[0]
    item = (float(loglikelihood), int(doc["n_tokens"]))
    return {"nll": item, "token_perplexity": item}


def token_weighted_nll(items: list) -> float:
    """-sum(loglikelihood) / sum(tokens): the mean NLL per response token."""
    return -sum(ll for ll, _ in items) / max(sum(n for _, n in items), 1)


def token_perplexity(items: list) -> float:
    return math.exp(token_weighted_nll(items))


def process_generation(doc: dict, results: list) -> dict:
    """Per doc: the response's length in words (the responses themselves are kept from the logged samples)."""
    return {"response_words": len(str(results[0]).split())}


# -------------------------------------------------------------------------------------- the task files

_HEADER = (
    "# Generated from sift_llm/evaluation/heldout.py (render_task_files) by\n"
    "# `python -m sift_llm.evaluation.heldout --write`; edit the Python, not this file.\n"
)
_HOOK = "custom_dataset: !function sift_llm.evaluation.heldout.load_docs"


def render_task_files() -> dict[str, str]:
    """File name -> text of every task file under ``eval/heldout/``."""
    return {
        f"{LIKELIHOOD}.yaml": _HEADER + "\n".join([
            f"task: {LIKELIHOOD}",
            _HOOK,
            "dataset_kwargs:",
            "  part: likelihood",
            "test_split: test",
            "output_type: loglikelihood",
            "doc_to_text: prompt",
            "doc_to_target: response",
            'target_delimiter: ""',
            "process_results: !function sift_llm.evaluation.heldout.process_likelihood",
            "metric_list:",
            "  - metric: nll",
            "    aggregation: !function sift_llm.evaluation.heldout.token_weighted_nll",
            "    higher_is_better: false",
            "  - metric: token_perplexity",
            "    aggregation: !function sift_llm.evaluation.heldout.token_perplexity",
            "    higher_is_better: false",
            "metadata:",
            f"  version: {TASK_VERSION}.0",
            "",
        ]),
        f"{GENERATION}.yaml": _HEADER + "\n".join([
            f"task: {GENERATION}",
            _HOOK,
            "dataset_kwargs:",
            "  part: generation",
            "test_split: test",
            "output_type: generate_until",
            "doc_to_text: prompt",
            "doc_to_target: reference",
            'target_delimiter: ""',
            "generation_kwargs:",
            "  until: []",
            "  do_sample: false",
            "  max_gen_toks: 128",
            "process_results: !function sift_llm.evaluation.heldout.process_generation",
            "metric_list:",
            "  - metric: response_words",
            "    aggregation: mean",
            "    higher_is_better: true",
            "metadata:",
            f"  version: {TASK_VERSION}.0",
            "",
        ]),
    }


def task_dir() -> Path:
    from sift_llm.evaluation.taskfiles import committed_or_generated

    return committed_or_generated(COMMITTED_TASK_DIR, GROUP, TASK_VERSION, render_task_files())


def main(argv: list[str] | None = None) -> int:
    from sift_llm.evaluation.taskfiles import main as taskfiles_main

    return taskfiles_main(argv, prog="python -m sift_llm.evaluation.heldout", what="the held-out tasks (eval/heldout)",
                          default_dir=COMMITTED_TASK_DIR, files=render_task_files())


if __name__ == "__main__":
    raise SystemExit(main())
