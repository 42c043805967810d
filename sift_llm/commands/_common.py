"""Arguments every config-driven subcommand shares."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (e.g. configs/demo.yaml)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.key=value",
        help="override config values, parsed as YAML (e.g. train.learning_rate=1e-4 method.sift.density=0.05)",
    )
