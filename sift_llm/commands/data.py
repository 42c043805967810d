"""``sift-llm data``: tokenize and mask an instruction or chat corpus into a training set on disk."""

from __future__ import annotations

import argparse

from sift_llm.commands._common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="tokenize and prompt-mask a corpus (Alpaca/dolly JSON(L), ShareGPT or messages chat)",
        description=(
            "Read the corpus named by the config's data section, render prompts (Alpaca template, or the "
            "tokenizer's chat template for chat records), mask everything but the response, apply the "
            "truncation policy, split train/validation and write an HF dataset plus stats.json. The output "
            "is cached by a fingerprint of input bytes, tokenizer, template and options."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument("--skip-invalid", action="store_true", help="drop malformed rows and report each")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm.config import load_config
    from sift_llm.data import prepare

    overrides = list(args.overrides) + (["data.skip_invalid=true"] if args.skip_invalid else [])
    cfg = load_config(args.config, overrides)
    prepared = prepare(cfg.data, cfg.model.path)
    stats = prepared.stats
    if prepared.cached:
        print(f"data: reused cached dataset (fingerprint {stats['fingerprint'][:16]}, nothing recomputed)")
    lengths = stats["length_percentiles"]
    print(
        f"data: {stats['rows_read']} rows -> {stats['train_examples']} train + {stats['validation_examples']} "
        f"validation examples, {stats['tokens']} tokens ({stats['target_tokens']} learned), "
        f"length p50 {lengths['p50']} / p99 {lengths['p99']} / max {lengths['max']}, "
        f"{stats['truncated']} truncated, {stats['dropped']} dropped"
    )
    if not prepared.cached:
        print(f"data: {stats['rows_per_second']} rows/s")
    for row in stats["dropped_rows"][:10]:
        print(f"  dropped row {row['row']} (line {row['line']}): {row['reason']}")
    print(f"dataset: {prepared.dataset_path}")
    print(f"stats:   {prepared.path / 'stats.json'}")
    return 0
