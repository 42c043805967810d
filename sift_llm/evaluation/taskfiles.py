"""lm-eval task YAMLs generated from Python tables: write them atomically, check a directory against them,
and find the directory to index (the committed copy in a source checkout, else one generated into the cache)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from sift_llm.fsio import atomic_dir


def write_files(directory: str | os.PathLike, files: dict[str, str]) -> Path:
    """Write ``files`` (name -> text) into ``directory`` atomically (the directory is replaced as a whole)."""
    directory = Path(directory)
    with atomic_dir(directory, replace=True) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return directory


def files_out_of_sync(directory: str | os.PathLike, files: dict[str, str]) -> list[str]:
    """Names of files that differ between ``directory`` and ``files`` (missing, stale or extra)."""
    directory = Path(directory)
    present = {p.name for p in directory.iterdir() if p.is_file()} if directory.is_dir() else set()
    problems = [f"extra: {name}" for name in sorted(present - set(files))]
    for name, text in files.items():
        if name not in present:
            problems.append(f"missing: {name}")
        elif (directory / name).read_text(encoding="utf-8") != text:
            problems.append(f"stale: {name}")
    return problems


def committed_or_generated(committed: Path, name: str, version: int, files: dict[str, str]) -> Path:
    """``committed`` when this is a source checkout (tests keep it in sync with the table), else a copy
    generated into the cache (an installed wheel does not ship ``eval/``)."""
    if committed.is_dir():
        return committed
    from sift_llm.evaluation.config import cache_root

    generated = cache_root() / "tasks" / f"{name}-v{version}" / name
    if not generated.is_dir() or files_out_of_sync(generated, files):
        write_files(generated, files)
    return generated


def main(argv: list[str] | None, *, prog: str, what: str, default_dir: Path, files: dict[str, str]) -> int:
    """``--write`` (regenerate) or ``--check`` (exit 1 and list the differences) for one task directory."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Generate or check the lm-eval task files of {what}.")
    parser.add_argument("--dir", default=str(default_dir), help="task directory (default: %(default)s)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="(re)write the task files")
    mode.add_argument("--check", action="store_true", help="exit 1 if the files differ from the table")
    args = parser.parse_args(argv)
    if args.write:
        print(write_files(args.dir, files))
        return 0
    problems = files_out_of_sync(args.dir, files)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0
