"""Run lm-eval through its own command line (``python -m lm_eval run --model hf``) on a model directory.

The ``cli`` backend: a base, merged or fully tuned model directory, optionally with a PEFT adapter
(``peft=``). A SIFT adapter goes in the same way: it is first exported to PEFT's supertuning format
(:func:`sift_llm.sift.peft_export.export_peft`, into a scratch directory), so lm-eval's own hf model applies
the increments with plain PEFT. The held-out tasks need the in-memory backend's exact token scoring and are
skipped here (the results record why).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation import mmlu
from sift_llm.evaluation.config import EvalConfig
from sift_llm.evaluation.heldout import HeldOutSource
from sift_llm.evaluation.results import clean_results
from sift_llm.evaluation.tasks import check_tasks, include_dirs, task_metadata
from sift_llm.loading import check_model_dir, detect_adapter, dtype_name, force_offline, resolve_device, resolve_dtype
from sift_llm.runtime import is_rank0, log

# Variables that would make a child lm_eval think it is one rank of a distributed job.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
HELDOUT_SKIPPED = ("the held-out tasks score the dataset's own tokens, which needs the in-memory backend "
                   "(eval.backend memory); the lm_eval CLI re-tokenises strings")


def _merged_include_dir(dirs: list[Path], scratch: Path) -> Path:
    """lm_eval's CLI takes one --include_path: copy several task directories under one root."""
    if len(dirs) == 1:
        return dirs[0]
    root = scratch / "tasks"
    for i, directory in enumerate(dirs):
        shutil.copytree(directory, root / f"{i}_{directory.name}", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def cli_command(model_dir: Path, cfg: EvalConfig, *, adapter_dir: Path | None, device: str, dtype: str,
                include_dir: Path, output_json: Path) -> list[str]:
    """The ``python -m lm_eval run ...`` command line for a model directory."""
    for value, what in ((model_dir, "model"), (adapter_dir, "adapter")):
        if value is not None and "," in str(value):
            raise UserError(f"{what} path {value} contains a comma, which lm_eval's --model_args cannot carry")
    model_args = f"pretrained={model_dir},dtype={dtype}"
    if adapter_dir is not None:
        model_args += f",peft={adapter_dir}"
    cmd = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "hf",
        "--model_args", model_args,
        "--tasks", ",".join(cfg.tasks),
        "--device", device,
        "--batch_size", str(cfg.batch_size),
        "--num_fewshot", str(cfg.num_fewshot),
        "--include_path", str(include_dir),
        "--output_path", str(output_json),
    ]
    if cfg.limit is not None:
        cmd += ["--limit", str(cfg.limit)]
    if cfg.apply_chat_template:
        cmd += ["--apply_chat_template"]
    return cmd


def _child_env(metadata: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if "mmlu_file" in metadata:
        env[mmlu.ENV_FILE] = metadata["mmlu_file"]
    # the task files name sift_llm.evaluation.mmlu, so the child must import this very package
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def evaluate_with_cli(model_dir: str | os.PathLike, cfg: EvalConfig, adapter_dir: str | os.PathLike | None = None,
                      *, heldout: HeldOutSource | None = None) -> dict:
    """Run ``lm_eval`` as a subprocess on a model directory (a PEFT adapter goes in as ``peft=``)."""
    from sift_llm.evaluation.harness import stamp

    force_offline()
    check_tasks(cfg)
    model_dir = check_model_dir(model_dir).resolve()
    adapter = Path(adapter_dir).expanduser().resolve() if adapter_dir is not None else None
    kind = detect_adapter(adapter) if adapter is not None else None
    dev = resolve_device(cfg.device)
    dtype = dtype_name(resolve_dtype(cfg.dtype, dev))
    metadata = task_metadata(cfg)
    if cfg.log_samples:
        log("eval: log_samples is not kept on the lm_eval CLI path; use eval.backend memory for per-question records")
    extra: dict[str, Any] = {}
    if heldout is not None and heldout.tasks:
        log(f"eval: held-out tasks skipped: {HELDOUT_SKIPPED}")
        extra["heldout_skipped"] = HELDOUT_SKIPPED
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sift-llm-lm-eval-") as scratch_name:
        scratch = Path(scratch_name)
        include = _merged_include_dir(include_dirs(cfg), scratch)
        peft_dir = adapter
        if kind == "sift":
            # lm_eval's hf model loads PEFT adapters only: hand it the SIFT adapter as a supertuning adapter
            # (refused, with a PeftPaddingError, where the zero padding PEFT's one sparsity needs is large).
            from sift_llm.sift.peft_export import export_peft

            peft_dir = export_peft(adapter, scratch / "peft", base_model=model_dir)
            log(f"eval: SIFT adapter {adapter} exported to PEFT's supertuning format for lm_eval")
        cmd = cli_command(model_dir, cfg, adapter_dir=peft_dir, device=str(dev), dtype=dtype,
                          include_dir=include, output_json=scratch / "out" / "results.json")
        log(f"eval: {' '.join(cmd[1:])}")
        tail: collections.deque[str] = collections.deque(maxlen=40)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_child_env(metadata), cwd=scratch, errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if is_rank0():
                    sys.stderr.write(line)
            returncode = proc.wait()
        if returncode != 0:
            raise UserError(f"lm_eval exited with status {returncode}; its last lines:\n" + "\n".join(tail))
        found = sorted((scratch / "out").glob("results*.json"))
        if not found:
            raise RuntimeError(f"lm_eval finished but wrote no results under {scratch / 'out'}")
        raw = json.loads(found[-1].read_text(encoding="utf-8"))
    info = {"model": str(model_dir), "adapter": str(adapter) if adapter else None, "adapter_kind": kind,
            "device": str(dev), "dtype": dtype}
    results = clean_results(raw, keep_samples=False)
    return stamp(results, cfg, info, backend="cli", command=cmd,
                 elapsed_s=round(time.perf_counter() - start, 3), **extra)
