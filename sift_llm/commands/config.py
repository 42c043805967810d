"""``sift-llm config``: show a resolved experiment config, one value of it, or every key with its help."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="print a resolved experiment config, one value (--get), or every key with its help (--keys)",
        description="Validate an experiment config with its overrides and print the result.",
    )
    parser.add_argument("config", nargs="?", help="experiment YAML (omit with --keys)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="overrides, parsed as YAML")
    parser.add_argument("--get", metavar="KEY", help="print one resolved value (e.g. run_dir, train.learning_rate)")
    parser.add_argument("--keys", action="store_true", help="list every key with its type, default and help")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm import schema
    from sift_llm.config import ExperimentConfig, dump_config, load_config
    from sift_llm.errors import UserError

    if args.keys:
        for key, type_name, default, help_text in schema.describe(ExperimentConfig):
            print(f"{key}  ({type_name}; default {default!r})\n    {help_text}" if help_text else
                  f"{key}  ({type_name}; default {default!r})")
        return 0
    if not args.config:
        raise UserError("give a config file, or --keys")
    cfg = load_config(args.config, args.overrides)
    if args.get is None:
        print(dump_config(cfg), end="")
        return 0
    value = cfg
    for part in args.get.split("."):
        if not hasattr(value, part):
            raise UserError(f"--get {args.get}: no key {part!r}")
        value = getattr(value, part)
    print(value)
    return 0
