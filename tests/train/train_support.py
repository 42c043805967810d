from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from sift_llm.runtime import free_port

REPO = Path(__file__).resolve().parents[2]

# Short, repetitive instructions: a tiny model visibly lowers its loss on them within a few steps.
ROWS = [
    {"instruction": f"Say the number {n}.", "input": "", "output": f"The answer is {n}."} for n in range(12)
]


@pytest.fixture
def make_config(tmp_path, tiny_model_dir):
    """Write an experiment YAML for the tiny model and a 12-row corpus; keyword sections override defaults."""
    return config_writer(tmp_path, tiny_model_dir)


def config_writer(tmp_path: Path, tiny_model_dir: Path):
    """make_config's function, for fixtures of a wider scope."""
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))

    def make(name: str = "run", **sections) -> Path:
        cfg = {
            "name": name,
            "output_dir": str(tmp_path / name),
            "model": {"path": str(tiny_model_dir)},
            "data": {"path": str(data), "validation_size": 2, "output_dir": str(tmp_path / "data")},
            "method": {"name": "sift", "sift": {"density": 0.1}},
            "train": {"max_steps": 6, "micro_batch_size": 2, "learning_rate": 0.01, "warmup_ratio": 0.0,
                      "lr_scheduler": "constant"},
        }
        for section, values in sections.items():
            if isinstance(values, dict):
                cfg.setdefault(section, {}).update(values)
            else:
                cfg[section] = values
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


def launch(config: Path, *args: str, ranks: int = 2, env: dict | None = None, timeout: int = 400):
    """Run launch.sh exactly as a user would: the deepspeed launcher with ``ranks`` local CPU ranks."""
    port = free_port()
    command = ["bash", str(REPO / "launch.sh"), str(config), "--num_gpus", str(ranks),
               "--master_port", str(port), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    try:
        result = subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
        # What the run itself left in /dev/shm (a finished run unlinks its buffers; a killed one cannot).
        result.leftover_shm = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
        return result
    finally:
        remove_shm_buffers(port)


def remove_shm_buffers(port: int) -> None:
    """A killed run cannot unlink its DeepSpeed /dev/shm all-reduce buffers (66 MiB per rank): do it for it."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def launched(config: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """launch() that must succeed; on failure the assertion shows the end of the run's output."""
    result = launch(config, *args, **kwargs)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
