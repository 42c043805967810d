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
            "breakdown; and the smallest density that keeps --keep of the norm. Writes analysis.json, summary.md "
            "and PNG plots to --output (default <run_dir>/analysis)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--batches", type=int, metavar="N", help="micro-batches measured (default 4)")
    parser.add_argument(
        "--shares", metavar="LIST", help="comma-separated top fractions to report (default 0.001,0.01,0.05,0.1)"
    )
    parser.add_argument(
        "--coverage-share", type=float, metavar="X",
        help="top-set size for first-batch coverage, overlap and the breakdown (default 0.01)",
    )
    parser.add_argument("--keep", type=float, metavar="Q", help="share of the norm the suggested density keeps (0.9)")
    parser.add_argument("--output", metavar="DIR", help="output directory (default <run_dir>/analysis)")
    parser.add_argument(
        "--no-random-init", dest="random_init", action="store_false", default=None,
        help="skip the randomly initialised comparison",
    )
    parser.set_defaults(func=run)


def analysis_options(args: argparse.Namespace, base: dict | None = None) -> dict:
    """The ``analysis`` mapping: the config's section (when there is one), then the flags that were given."""
    from sift_llm.errors import UserError

    options = dict(base or {})
    if args.shares is not None:
        try:
            options["shares"] = [float(part) for part in args.shares.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--shares {args.shares!r}: expected comma-separated numbers, e.g. 0.001,0.01,0.05") from None
    for key in ("batches", "coverage_share", "keep", "output", "random_init"):
        value = getattr(args, key)
        if value is not None:
            options[key] = value
    return options


def run(args: argparse.Namespace) -> int:
    from sift_llm import schema
    from sift_llm.analysis import AnalysisConfig, analyze
    from sift_llm.config import load_config

    cfg = load_config(args.config, args.overrides)
    acfg = schema.build(AnalysisConfig, analysis_options(args, schema.to_dict(cfg.analysis)), "analysis")
    out = analyze(cfg, acfg)
    print(f"analysis: {out / 'summary.md'}")
    print(f"data:     {out / 'analysis.json'}")
    return 0
