"""``sift-llm report``: markdown + charts from evaluated runs; several runs go into one comparison."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="report one evaluated run (base vs tuned) or compare several (e.g. SIFT vs LoRA vs full)",
        description=(
            "Build report.md (the held-out response likelihood first, then the tasks, each change against the "
            "base with its standard error and whether it is within noise, then generation samples), "
            "eval_summary.json, samples.json, a chart of the changes (eval_accuracy.png) and training curves "
            "(training_curves.png, from metrics.jsonl) from runs evaluated by `sift-llm eval RUN_DIR`. "
            "One RUN_DIR: base vs tuned, written into RUN_DIR unless --output is given. Several: one table and "
            "one chart with the base model and every run, labelled by the method.name of each run's "
            "config.yaml; --output is required."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="evaluated training run directories")
    parser.add_argument("--output", metavar="DIR", help="where the report goes (default: the run, for one run)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm.errors import UserError
    from sift_llm.evaluation import report

    if len(args.run_dirs) == 1:
        print(report.write_run_report(args.run_dirs[0], args.output))
        return 0
    if not args.output:
        raise UserError("several RUN_DIRs are compared into one report: give --output DIR")
    print(report.compare_runs(args.run_dirs, args.output))
    return 0
