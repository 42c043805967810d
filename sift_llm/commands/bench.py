"""``sift-llm bench``: SIFT vs LoRA vs full fine-tuning, measured side by side in one invocation."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark SIFT against LoRA and full fine-tuning: memory, step time, traffic, quality",
        description=(
            "Run the parts a bench config enables, each method on the same model, data and batch, methods "
            "alternated: cost (peak memory, step time, tokens/s, trainable state, bytes all-reduced per step, "
            "the selection pass; through launch.sh and DeepSpeed), quality (held-out loss after the same steps on "
            "the demo model and data), layer_stack (LLaMA-7B-shaped decoder layers in plain PyTorch, for a GPU), "
            "kernels (the SIFT layer's gradient paths), packing (packed vs padded batches through the trainer), "
            "memory (peak memory per rank under ZeRO-2, ZeRO-3 and ZeRO-3 offload, and the largest model that "
            "fits), selection (the selection pass alone, global vs per-matrix scope, per code version) and "
            "quantized (SIFT on a 4-bit base vs QLoRA). Results merge into OUTPUT/bench.json; bench.md (tables, "
            "and the targets the config's targets: section sets) and bench.png are rewritten from it."
        ),
    )
    parser.add_argument("config", nargs="?", default="benchmarks/cpu.yaml", help="bench YAML (default benchmarks/cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="override bench config values")
    from sift_llm.bench.config import PARTS

    parser.add_argument("--only", metavar="PARTS", help=f"comma-separated parts to run ({','.join(PARTS)})")
    parser.add_argument("--output", metavar="DIR", help="output directory (default: the config's output_dir)")
    parser.add_argument("--report-only", action="store_true", help="rewrite bench.md and bench.png from bench.json")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sift_llm.bench.config import PARTS, load_bench_config
    from sift_llm.bench.pipeline import run_bench
    from sift_llm.errors import UserError

    overrides = list(args.overrides)
    if args.output:
        overrides.append(f"output_dir={args.output}")
    cfg = load_bench_config(args.config, overrides)
    parts = cfg.enabled_parts()
    if args.only:
        parts = [part.strip() for part in args.only.split(",") if part.strip()]
        unknown = [part for part in parts if part not in PARTS]
        if unknown:
            raise UserError(f"--only: unknown part {unknown[0]!r}; parts are {', '.join(PARTS)}")
    run_bench(cfg, [] if args.report_only else parts)
    return 0
