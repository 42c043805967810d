"""``sift-llm analyze``: how sparse is the gradient of a config's model on its data, and which density fits."""

from __future__ import annotations

import argparse

from sift_llm.commands._common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="measure gradient sparsity (top-x%% shares, first-batch coverage, critical layers) and suggest a density",
        description=(
            "Compute the dense gradient of every targeted matrix (method.sift.targets) on the first N training "
            "micro-batches, for the pretrained model and the same architecture randomly initialised, and report: "
            "the share of each matrix's squared gradient norm held by its top entries; how much of later batches' "
            "norm batch 1's top set keeps and how the top sets overlap; a per-layer and per-module-type "
            "breakdown; and the smallest density that keeps analysis.keep of the norm. Writes analysis.json, "
            "summary.md and PNG plots to analysis.output (default <run_dir>/analysis). The analysis: keys are "
            "set like any other: analysis.batches=3 analysis.shares=[0.01,0.1] analysis.keep=0.8 "
            "analysis.random_init=false analysis.output=DIR."
        ),
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm.analysis import analyze
    from sift_llm.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = analyze(cfg, cfg.analysis)
    print(f"analysis: {out / 'summary.md'}")
    print(f"data:     {out / 'analysis.json'}")
    return 0
