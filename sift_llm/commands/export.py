"""``sift-llm export``: a trained run's adapter in another library's format (PEFT now)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Write a trained run's adapter in a format other tools load without sift_llm.

  --format peft  a PEFT 'supertuning' adapter (adapter_config.json + adapter_model.safetensors) that
                 peft.PeftModel.from_pretrained(base, OUTPUT) and
                 `lm_eval --model hf --model_args pretrained=BASE,peft=OUTPUT` load. Each SIFT matrix keeps
                 its indices and values; dense modules (method.sift.dense_modules) go in as modules_to_save.
                 PEFT sizes every matrix from one sparsity, so matrices are padded with zero values (exact:
                 adding zero changes no weight) up to PEFT's count; the padding is printed and recorded in
                 OUTPUT/sift_export.json, and the export is refused above --max-padding. Per-matrix
                 selections pad a few entries per matrix; global-scope selections usually exceed the limit.
                 A LoRA run's adapter is already a PEFT adapter: it is copied.

SOURCE is a run directory (reads RUN_DIR/adapter; the base model comes from RUN_DIR/train_summary.json or
RUN_DIR/config.yaml) or a SIFT adapter directory (the base named in its sift_adapter.json). The base model
directory is recorded as base_model_name_or_path; --base overrides it (e.g. after moving the base).
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a run's adapter in another format: --format peft (loads with plain PEFT and lm_eval)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="a training run directory, or a SIFT adapter directory")
    parser.add_argument("--format", choices=sorted(FORMATS), default="peft", help="output format (default peft)")
    parser.add_argument("--output", required=True, metavar="DIR", help="directory to write (must not exist)")
    parser.add_argument("--base", metavar="DIR", help="base model directory (default: the one the run trained on)")
    parser.add_argument(
        "--max-padding", type=float, metavar="SHARE", default=None,
        help="largest share of zero padding among the exported entries before refusing (default 0.1)",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(func=run)


def _run_peft(args: argparse.Namespace) -> int:
    from sift_llm.sift.peft_export import DEFAULT_MAX_PADDING, export_peft, read_export_report

    max_padding = DEFAULT_MAX_PADDING if args.max_padding is None else args.max_padding
    out = export_peft(args.source, args.output, base_model=args.base, max_padding=max_padding, replace=args.force)
    report = read_export_report(out)
    if report.get("pass_through"):
        print(f"export: {report['source']['adapter']} is a {report['peft_type']} PEFT adapter already; copied")
    else:
        print(
            f"export: {report['selected']:,} selected entries in {report['targeted']} matrices -> PEFT supertuning "
            f"at sparsity {report['sparsity']!r}: {report['exported']:,} entries, {report['padded']:,} of them zero "
            f"padding ({report['padded_share']:.2%})"
        )
        if report["untargeted_empty"]:
            print(f"export: {len(report['untargeted_empty'])} matrices with no selected entry are left untargeted")
        if report["modules_to_save"]:
            tied = f" (tied: {', '.join(sorted(report['tied']))})" if report["tied"] else ""
            print(f"export: dense modules as modules_to_save: {', '.join(report['modules_to_save'])}{tied}")
    print(f"adapter: {out}")
    print(f"base:    {report['base_model']}")
    print(f"lm_eval: --model hf --model_args pretrained={report['base_model']},peft={out.resolve()}")
    return 0


# Each format: a function of the parsed arguments; add new formats here.
FORMATS = {"peft": _run_peft}


def run(args: argparse.Namespace) -> int:
    return FORMATS[args.format](args)
