"""Training runs for the bench: an experiment YAML per method, started through launch.sh as a user would."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import yaml

from sift_llm.errors import UserError
from sift_llm.runtime import free_port, log

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINER_COMMAND = "sift_llm.cli train"  # what launch.sh has the DeepSpeed launcher run on every rank
# What a run leaves that the bench does not read: large, and rewritten by every run.
SCRATCH = ("checkpoints", "adapter", "merged", "tensorboard")
# The SIFT layer's previous kernels (a dense copy of W per product, dense row-block dW), for before/after rows:
# layer options of the sift config section (method.sift.merge / method.sift.values_grad).
BEFORE_KERNELS = {"merge": "clone", "values_grad": "dense"}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_")


def method_section(variant: dict) -> dict:
    """The experiment config's ``method:`` section for a bench variant."""
    if variant["method"] == "sift":
        kernels = BEFORE_KERNELS if variant.get("before") else {}
        scope = {"scope": variant["scope"]} if variant.get("scope") else {}
        return {"name": "sift", "sift": {"density": variant["density"], **scope, **kernels}}
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


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(child) for child in handle.read().split()]
    except (OSError, ValueError):
        return []


def _rss_and_command(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            rss = next((int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:")), 0)
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    return rss, command


class RssSampler:
    """The peak resident set of every process under ``pid`` (VmRSS read from /proc every ``interval`` seconds).

    This is each rank's peak over its whole life (loading, selection, steps, export), which the trainer's own
    VmHWM readings cannot give: they reset the high-water mark per phase. Peaks shorter than the interval can
    be missed; the trainer's in-process phase peaks (exact) sit next to these.
    """

    def __init__(self, pid: int, interval: float):
        self.pid, self.interval = pid, interval
        self.peaks: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            todo = [(self.pid, None)]
            while todo:
                pid, parent = todo.pop()
                todo += [(child, pid) for child in _children(pid)]
                read = _rss_and_command(pid)
                if read is None:
                    continue
                entry = self.peaks.setdefault(pid, {"pid": pid, "parent": parent, "command": read[1],
                                                    "peak_rss_bytes": 0})
                # A child read between fork and exec still shows its parent's command line: keep the latest.
                entry["command"] = read[1] or entry["command"]
                entry["peak_rss_bytes"] = max(entry["peak_rss_bytes"], read[0])
            self._stop.wait(self.interval)

    def rank_peaks(self) -> list[int]:
        """Peak RSS of each training rank, in start order: the trainer processes the DeepSpeed launcher started
        (not their own forked helpers, and not the short-lived tools the launcher itself runs, such as a CPU
        topology probe, which a sample can catch as the launcher's child)."""
        launchers = {pid for pid, entry in self.peaks.items() if "deepspeed.launcher.launch" in entry["command"]}
        ranks = [entry for entry in self.peaks.values()
                 if entry["parent"] in launchers and TRAINER_COMMAND in entry["command"]]
        return [entry["peak_rss_bytes"] for entry in sorted(ranks, key=lambda entry: entry["pid"])]


def launch(experiment: dict, run_dir: Path, ranks: int, env: dict | None = None, timeout: int = 3600,
           root: Path | None = None, sample_rss: float | None = None) -> Path:
    """Write ``experiment`` to run_dir/bench_config.yaml, train it with launch.sh on ``ranks`` ranks, return run_dir.

    ``root``: the checkout whose launch.sh (and so trainer) runs, default this one. ``sample_rss``: also sample
    every rank's RSS at this interval (seconds) into run_dir/rss_peaks.json (:class:`RssSampler`).
    """
    root = Path(root) if root is not None else REPO_ROOT
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    config = run_dir / "bench_config.yaml"
    config.write_text(yaml.safe_dump({**experiment, "output_dir": str(run_dir.resolve())}, sort_keys=False))
    port = free_port()
    command = ["bash", str(root / "launch.sh"), str(config), "--num_gpus", str(ranks), "--master_port", str(port)]
    full_env = {**os.environ, "SIFT_LLM_COUNT_COLLECTIVES": "1", **(env or {})}
    sampler = None
    try:
        with open(run_dir / "launch.log", "w") as out:
            process = subprocess.Popen(command, cwd=root, env=full_env, stdout=out, stderr=subprocess.STDOUT)
            try:
                if sample_rss:
                    sampler = RssSampler(process.pid, sample_rss)
                    with sampler:
                        process.wait(timeout=timeout)
                else:
                    process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise UserError(f"bench run {run_dir} timed out after {timeout} s") from None
        result = subprocess.CompletedProcess(command, process.returncode)
    finally:
        _remove_shm_buffers(port)
    if sampler is not None:
        (run_dir / "rss_peaks.json").write_text(json.dumps(
            {"interval_s": sample_rss, "ranks": sampler.rank_peaks(), "processes": list(sampler.peaks.values())},
            indent=1))
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
    if (run_dir / "rss_peaks.json").is_file():
        out["rss_peaks"] = json.loads((run_dir / "rss_peaks.json").read_text())
    return out


def progress_line(label: str, row: dict) -> None:
    log(f"  {label}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
