"""Training runs for the bench: an experiment YAML per method, started through launch.sh as a user would."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import yaml

from sift_llm.errors import UserError
from sift_llm.runtime import log

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a run leaves that the bench does not read: large, and rewritten by every run.
SCRATCH = ("checkpoints", "adapter", "merged", "tensorboard")
# The SIFT layer's previous kernels (a dense copy of W per product, dense row-block dW), for before/after rows:
# layer options of the sift config section (method.sift.merge / method.sift.values_grad).
BEFORE_KERNELS = {"merge": "clone", "values_grad": "dense"}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def method_section(variant: dict) -> dict:
    """The experiment config's ``method:`` section for a bench variant."""
    if variant["method"] == "sift":
        kernels = BEFORE_KERNELS if variant.get("before") else {}
        return {"name": "sift", "sift": {"density": variant["density"], **kernels}}
    if variant["method"] == "lora":
        return {"name": "lora", "lora": {"r": variant["r"], "alpha": 2.0 * variant["r"]}}
    return {"name": "full"}


def _remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves one /dev/shm buffer per rank and master port (66 MiB each)
    after the processes exit; remove this run's, or a long bench fills the RAM-backed /dev/shm."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def finished(run_dir: Path, experiment: dict) -> bool:
    """Whether run_dir holds a finished run of exactly this experiment (quality runs are reused)."""
    config = run_dir / "bench_config.yaml"
    if not (run_dir / "train_summary.json").is_file() or not config.is_file():
        return False
    return yaml.safe_load(config.read_text()) == {**experiment, "output_dir": str(run_dir.resolve())}


def launch(experiment: dict, run_dir: Path, ranks: int, env: dict | None = None, timeout: int = 3600) -> Path:
    """Write ``experiment`` to run_dir/bench_config.yaml, train it with launch.sh on ``ranks`` ranks, return run_dir."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = run_dir / "bench_config.yaml"
    config.write_text(yaml.safe_dump({**experiment, "output_dir": str(run_dir.resolve())}, sort_keys=False))
    port = _free_port()
    command = ["bash", str(REPO_ROOT / "launch.sh"), str(config), "--num_gpus", str(ranks), "--master_port", str(port)]
    full_env = {**os.environ, "SIFT_LLM_COUNT_COLLECTIVES": "1", **(env or {})}
    try:
        with open(run_dir / "launch.log", "w") as out:
            result = subprocess.run(command, cwd=REPO_ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout)
    finally:
        _remove_shm_buffers(port)
    if result.returncode != 0:
        tail = (run_dir / "launch.log").read_text(errors="replace")[-3000:]
        if not (run_dir / "train_summary.json").is_file():
            raise UserError(f"bench run {run_dir} failed (exit {result.returncode}):\n{tail}")
        # Training finished and wrote its summary; a rank then died at exit (seen: gloo threads aborting).
        log(f"  warning: {run_dir} exited with {result.returncode} after finishing; its measurements are kept")
        (run_dir / "exit_code").write_text(f"{result.returncode}\n")
    for name in SCRATCH:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    return run_dir


def read_run(run_dir: Path) -> dict:
    """metrics.jsonl split into step and eval records, train_summary.json, and selection.json when present."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    out = {
        "steps": [r for r in records if "step_time_s" in r],
        "evals": [r for r in records if "eval_loss" in r],
        "summary": json.loads((run_dir / "train_summary.json").read_text()),
    }
    if (run_dir / "selection.json").is_file():
        out["selection"] = json.loads((run_dir / "selection.json").read_text())
    return out


def progress_line(label: str, row: dict) -> None:
    log(f"  {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
