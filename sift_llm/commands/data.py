"""``sift-llm data``: tokenize and mask an instruction or chat corpus into a training set on disk."""

from __future__ import annotations

import argparse

from sift_llm.commands._common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data",
        help="tokenize and prompt-mask a corpus (Alpaca/dolly, ShareGPT or OpenAI messages with tools; "
        "JSON(L), Parquet, CSV, save_to_disk or hf:ORG/NAME; mixtures; packing)",
        description=(
            "Read the corpus named by the config's data section, render prompts (Alpaca template, or the "
            "tokenizer's chat template for chat records), mask everything but the response, apply the "
            "truncation policy, mix the sources (data.sources), split train/validation, pack the train split "
            "(data.packing) and write an HF dataset plus stats.json. The output is cached by a fingerprint of "
            "input bytes, tokenizer, template and options. data.skip_invalid=true drops malformed rows (each reported) "
            "instead of failing."
        ),
    )
    add_config_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm.config import load_config
    from sift_llm.data import prepare

    cfg = load_config(args.config, args.overrides)
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
    if len(stats.get("sources", [])) > 1:
        for source in stats["sources"]:
            print(f"  {source['name']}: {source['rows_read']} rows read, {source['rows_drawn']} drawn -> "
                  f"{source['train_examples']} train + {source['validation_examples']} validation, "
                  f"{source['tokens']} tokens, {source['dropped']} dropped")
    if stats.get("packing"):
        packing = stats["packing"]
        print(f"data: packed {packing['examples']} train examples into {packing['sequences']} sequences "
              f"({packing['examples_per_sequence']} per sequence, {packing['fill']:.1%} full)")
    if not prepared.cached:
        print(f"data: {stats['rows_per_second']} rows/s end to end, {stats['encode']['rows_per_second']} rows/s encoding")
    for row in stats["dropped_rows"][:10]:
        where = (f"{row['source']}: " if "source" in row else "") + f"row {row['row']}"
        where += f" (line {row['line']})" if row.get("line") is not None else ""
        print(f"  dropped {where}: {row['reason']}")
    if len(stats["dropped_rows"]) > 10:
        print(f"  ... {len(stats['dropped_rows']) - 10} more in stats.json")
    print(f"dataset: {prepared.dataset_path}")
    print(f"stats:   {prepared.path / 'stats.json'}")
    return 0
