"""Run the enabled bench parts, merge their results into bench.json, and write bench.md and bench.png."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time

from sift_llm import schema
from sift_llm.bench.config import BenchConfig
from sift_llm.fsio import atomic_write_json
from sift_llm.runtime import log

RESULTS_NAME = "bench.json"


def machine() -> dict:
    import os

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def load_results(cfg: BenchConfig) -> dict:
    path = cfg.output / RESULTS_NAME
    if path.is_file():
        return json.loads(path.read_text())
    return {"parts": {}}


def run_part(cfg: BenchConfig, part: str) -> dict:
    if part == "cost":
        from sift_llm.bench.cost import run_cost

        return run_cost(cfg)
    if part == "quality":
        from sift_llm.bench.quality import run_quality

        return run_quality(cfg)
    if part == "layer_stack":
        from sift_llm.bench.layer_stack import run_layer_stack

        return run_layer_stack(cfg.layer_stack)
    if part == "packing":
        from sift_llm.bench.packing import run_packing

        return run_packing(cfg)
    if part == "memory":
        from sift_llm.bench.memory import run_memory

        return run_memory(cfg)
    if part == "selection":
        from sift_llm.bench.selection_scaling import run_selection

        return run_selection(cfg)
    if part == "quantized":
        from sift_llm.bench.quantized import run_quantized

        return run_quantized(cfg)
    from sift_llm.bench.kernels import run_kernels

    return run_kernels(cfg.kernels)


def run_bench(cfg: BenchConfig, parts: list[str]) -> dict:
    """Run ``parts`` in order, saving after each, then write the report; returns the merged results."""
    from sift_llm.bench.report import write_report

    cfg.output.mkdir(parents=True, exist_ok=True)
    results = load_results(cfg)
    # The limits the ratios are held to are the bench YAML's (its targets: section), kept with the results.
    results["targets"] = dict(cfg.targets)
    command = "sift-llm " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    for part in parts:
        log(f"bench: {part}")
        started = time.perf_counter()
        result = run_part(cfg, part)
        result["wall_s"] = time.perf_counter() - started
        result["config"] = schema.to_dict(getattr(cfg, part))
        result["machine"] = machine()
        result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if command:
            result["command"] = command
        results["parts"][part] = result
        results["name"] = cfg.name
        atomic_write_json(cfg.output / RESULTS_NAME, results)
    write_report(results, cfg.output)
    return results
