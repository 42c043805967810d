from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

# Short instructions of varied length, so micro-batches differ.
ROWS = [
    {"instruction": f"Say the number {n}{' twice' * (n % 3)}.", "input": "", "output": f"The answer is {n}. " * (1 + n % 4)}
    for n in range(16)
]


def write_experiment(directory: Path, model_dir: Path, **sections) -> Path:
    """An experiment YAML for the tiny model and a 16-row corpus in ``directory``; sections override defaults."""
    data = directory / "corpus.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    cfg = {
        "name": "analysis",
        "output_dir": str(directory / "run"),
        "model": {"path": str(model_dir)},
        "data": {"path": str(data), "validation_size": 2, "output_dir": str(directory / "data"), "max_length": 64},
        "train": {"micro_batch_size": 2},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    path = directory / "analysis.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def experiment_writer():
    return write_experiment


@pytest.fixture
def analysis_config(tmp_path, tiny_model_dir):
    """make(**sections) -> path of an experiment YAML for the tiny model (run dir under tmp_path/run)."""
    return lambda **sections: write_experiment(tmp_path, tiny_model_dir, **sections)
