"""The ``sift-llm`` command: one subcommand per stage, each runnable on its own."""

from __future__ import annotations

import argparse
import importlib
import sys

from sift_llm import __version__
from sift_llm.errors import UserError

# Each module under sift_llm.commands defines register(subparsers); heavy imports stay inside run().
COMMANDS = ["assets", "data", "train", "eval", "export", "report", "bench", "analyze", "config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sift-llm",
        description="Instruction tuning with Sparse Increment Fine-Tuning (SIFT): data -> train -> eval.",
    )
    parser.add_argument("--version", action="version", version=f"sift-llm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"sift_llm.commands.{name}").register(subparsers)
    return parser


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; ``section.key=value`` overrides may also come after the options.

    argparse fills a subcommand's trailing ``overrides`` positional only from the first run of positionals,
    so ``bench CONFIG --only memory memory.steps=3`` would leave the override unrecognised.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [token for token in extra if token.startswith("-") or "=" not in token]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"sift-llm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
