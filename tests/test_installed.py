"""A non-editable install (``pip install .``) trains and evaluates from a directory that is not the checkout:
the DeepSpeed configs, experiment configs and lm-eval task files travel inside the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package built as a wheel and installed into a directory of its own (no dependencies)."""
    target = tmp_path_factory.mktemp("site")
    build = tmp_path_factory.mktemp("build")
    # Build from a copy, so the checkout gets no build/ directory and the install cannot point back at it.
    # The files of the working tree (tracked, and new ones git does not ignore).
    archive = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             check=True, capture_output=True)
    source = build / "src"
    for name in archive.stdout.decode().split("\0"):
        if not name:
            continue
        origin, copy = REPO / name, source / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            copy.symlink_to(os.readlink(origin))
        elif origin.is_file():
            copy.write_bytes(origin.read_bytes())
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                             "--target", str(target), str(source)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def _run(args: list[str], cwd: Path, site: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_carries_the_shipped_files(installed):
    shipped = installed / "sift_llm" / "shipped"
    assert sorted(p.name for p in (shipped / "ds_configs").glob("*.json")) == sorted(
        p.name for p in (REPO / "ds_configs").glob("*.json"))
    assert (shipped / "configs" / "demo.yaml").is_file()
    assert (shipped / "eval" / "mmlu_offline" / "_mmlu_offline.yaml").is_file()
    assert (shipped / "eval" / "heldout" / "heldout_likelihood.yaml").is_file()
    assert not (shipped / "ds_configs").is_symlink()  # copied, not linked back to a checkout


def test_an_installed_sift_llm_trains_and_evaluates_outside_the_checkout(installed, tmp_path, tiny_model_dir):
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run(["-c", "import sift_llm, sys; print(sift_llm.__file__)"], work, installed)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr

    sys.path.insert(0, str(REPO / "tests" / "evaluation"))
    from eval_helpers import write_mmlu_file

    from sift_llm.evaluation import mmlu

    rows = [{"instruction": f"Say the number {n}.", "input": "", "output": f"The answer is {n}."} for n in range(12)]
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in rows))
    mmlu_file = write_mmlu_file(work / "mmlu.jsonl", {subject: ["A"] for subject in mmlu.SUBJECTS})
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump({
        "name": "installed", "output_dir": str(work / "run"),
        "model": {"path": str(tiny_model_dir)},
        "data": {"path": str(corpus), "validation_size": 2, "output_dir": str(work / "data")},
        "method": {"name": "sift", "sift": {"density": 0.1}},
        "train": {"max_steps": 2, "micro_batch_size": 2, "learning_rate": 0.01},
        # deepspeed.config keeps its default, ds_configs/zero2.json: found among the shipped files
        "eval": {"tasks": ["mmlu_offline"], "limit": 1, "batch_size": 4, "mmlu_file": str(mmlu_file),
                 "samples": 1, "max_new_tokens": 4},
    }))
    trained = _run(["-m", "sift_llm.cli", "train", str(config)], work, installed)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (work / "run" / "adapter" / "sift_adapter.safetensors").is_file()

    evaluated = _run(["-m", "sift_llm.cli", "eval", str(work / "run")], work, installed)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    report = (work / "run" / "report.md").read_text()
    assert "NLL per token" in report and "mmlu" in report.lower()

    # A shipped experiment config by its repository path, from elsewhere: read, not "no such config file".
    keys = _run(["-m", "sift_llm.cli", "config", "configs/demo.yaml"], work, installed)
    assert keys.returncode == 0 and "demo" in keys.stdout, keys.stderr[-2000:]
