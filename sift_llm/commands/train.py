"""``sift-llm train``: fine-tune under DeepSpeed as the experiment config describes (one rank per process)."""

from __future__ import annotations

import argparse

from sift_llm.commands._common import add_config_arguments


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune with SIFT, full fine-tuning or LoRA under DeepSpeed ZeRO",
        description=(
            "Train as the config describes. Run it directly for one process, or through launch.sh (the "
            "deepspeed launcher) for several GPUs, nodes, or local CPU ranks. Writes the run directory: "
            "config.yaml, metrics.jsonl, tensorboard/, selection.json (SIFT), checkpoints/, adapter/ "
            "(SIFT or LoRA) or merged/ (full, or with train.save_merged)."
        ),
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the run's latest checkpoint, or from the given checkpoint directory",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    import torch

    from sift_llm.config import load_config
    from sift_llm.errors import UserError
    from sift_llm.train.callbacks import default_callbacks
    from sift_llm.train.trainer import end_process, train

    if isinstance(args.resume, str) and "=" in args.resume and not Path(args.resume).exists():
        # `--resume section.key=value`: argparse took an override for the optional checkpoint path.
        args.overrides, args.resume = [*args.overrides, args.resume], True
    code = 0
    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg, resume=args.resume, callbacks=default_callbacks())
    except UserError as err:
        if not torch.distributed.is_initialized():
            raise  # nothing started yet: the CLI reports it as for any other command
        print(f"sift-llm train: error: {err}", file=sys.stderr)
        code = 2
    if torch.distributed.is_initialized():
        # Not a normal return: a live gloo process group aborts the interpreter's teardown (see end_process).
        end_process(code)
    return code
