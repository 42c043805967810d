"""Peak memory per rank of the same SIFT run under several DeepSpeed configs, and the largest model each fits.

For every model (the cost model at several depths, and any real model directories) and every DeepSpeed
config (ZeRO-2, ZeRO-3, ZeRO-3 with CPU offload by default), one SIFT run of a few steps through launch.sh, as
a user trains. Per rank it records:

- the trainer's own peaks, exact high-water marks of disjoint windows: loading the model and building the
  engine (process start to the selection), the selection pass, and the training steps (Linux VmHWM; CUDA max
  allocated on a GPU);
- the whole-life peak RSS, sampled from /proc by the bench (loading, selection, steps, checkpoint and
  export), which also measures a trainer that records no phase peaks (``trainer_root``: an older checkout);
- the parameter elements the rank holds (its ZeRO-3 partition, or every parameter).

**Bytes per parameter and the largest model.** For each DeepSpeed config, the largest rank's peak (the
largest of the phase peaks and the sampled whole-life peak; CUDA max allocated on a GPU) is fitted as
``fixed + slope x parameters`` over the cost model's depths (same width and vocabulary, so the fixed part
holds the process floor, the embeddings' share and the activations of this micro-batch). ``slope`` is the
measured marginal bytes per parameter. The largest trainable model has ``ranks x (fixed + slope x N)`` equal
to the budget on a CPU (the ranks share the machine's RAM) and ``fixed + slope x N`` equal to one GPU's
memory on GPUs. It is an extrapolation along this model family: a model of another width or vocabulary has
other activations and another embedding share.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sift_llm import assets
from sift_llm.bench.common import median
from sift_llm.bench.config import BenchConfig, MemoryConfig
from sift_llm.bench.cost import build_model_dir, model_facts, process_baseline_rss
from sift_llm.bench.runs import launch, read_run, slug
from sift_llm.runtime import log


def machine_budget(budget_gib: float | None) -> tuple[int, str]:
    """(bytes, what) the ranks may use: the configured GiB, one GPU's memory, or this machine's RAM."""
    if budget_gib is not None:
        return int(budget_gib * 2**30), f"{budget_gib:g} GiB (configured)"
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"one GPU's memory ({total / 2**30:.1f} GiB)"
    with open("/proc/meminfo") as handle:
        total = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("MemTotal:"))
    return total, f"this machine's RAM (MemTotal {total / 2**30:.1f} GiB)"


def experiment(mem: MemoryConfig, model_path: str, data_dir: Path, deepspeed_config: str, name: str) -> dict:
    return {
        "name": f"bench-memory-{slug(name)}",
        "seed": 42,
        "model": {"path": model_path},
        "data": {"path": mem.data, "format": "alpaca", "max_length": mem.max_length, "validation_size": 8,
                 "output_dir": str(data_dir)},
        "method": {"name": "sift", "sift": {"density": mem.density}},
        "train": {"max_steps": mem.steps, "micro_batch_size": mem.micro_batch_size, "learning_rate": 1e-5,
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "eval_batches": 1, "log_every": 1,
                  "precision": "auto"},
        "deepspeed": {"config": deepspeed_config},
    }


def _ds_facts(path: str) -> dict:
    config = json.loads(Path(path).read_text())
    zero = config.get("zero_optimization", {})
    return {"stage": zero.get("stage", 0),
            "offload_optimizer": (zero.get("offload_optimizer") or {}).get("device", "none"),
            "offload_param": (zero.get("offload_param") or {}).get("device", "none"),
            "param_persistence_threshold": zero.get("stage3_param_persistence_threshold")}


def _phase(record: dict | None, key: str) -> list | None:
    values = (record or {}).get(key)
    return values if values and any(v is not None for v in values) else None


def summarize(run: dict, cuda: bool) -> dict:
    """One run's per-rank numbers (lists, rank order)."""
    key = "cuda_max_allocated_bytes" if cuda else "rss_peak_bytes"
    selection = run.get("selection") or {}
    summary = run["summary"]
    out = {
        "load_peak": _phase(selection.get("load_peak_memory"), key),
        "selection_peak": _phase(selection.get("peak_memory"), key),
        "steps_peak": _phase(summary.get("peak_memory"), key),
        "whole_life_rss": (run.get("rss_peaks") or {}).get("ranks") or None,
        "resident_parameter_elements": summary.get("resident_parameter_elements")
        or selection.get("resident_parameter_elements"),
        "selection_s": selection.get("wall_seconds") or selection.get("calibration_seconds"),
        "step_time_s": median(r["step_time_s"] for r in run["steps"]),
        "zero_stage": summary.get("zero_stage"),
    }
    phases = [out[name] for name in ("load_peak", "selection_peak", "steps_peak")
              + (() if cuda else ("whole_life_rss",)) if out[name]]
    ranks = max(len(p) for p in phases) if phases else 0
    out["peak_per_rank"] = [max(p[r] for p in phases if r < len(p) and p[r] is not None) for r in range(ranks)]
    out["peak"] = max(out["peak_per_rank"]) if out["peak_per_rank"] else None
    return out


def fit(points: list[tuple[int, int]]) -> tuple[float, float] | None:
    """Least-squares (fixed, slope) of peak bytes over parameters; None with fewer than two sizes."""
    if len({n for n, _ in points}) < 2:
        return None
    mean_n = sum(n for n, _ in points) / len(points)
    mean_p = sum(p for _, p in points) / len(points)
    slope = sum((n - mean_n) * (p - mean_p) for n, p in points) / sum((n - mean_n) ** 2 for n, _ in points)
    return mean_p - slope * mean_n, slope


def largest_model(fixed: float, slope: float, budget: int, ranks: int, cuda: bool) -> float | None:
    """Parameters N with (ranks sharing the budget on a CPU) fixed + slope x N = the budget per rank."""
    per_rank = budget if cuda else budget / ranks
    if slope <= 0:
        return None
    return max(0.0, (per_rank - fixed) / slope)


def run_memory(cfg: BenchConfig) -> dict:
    mem = cfg.memory
    cuda = torch.cuda.is_available()
    work = cfg.work
    root = Path(mem.trainer_root).resolve() if mem.trainer_root else None
    data_dir = work / "memory-data" / (slug(str(root)) if root else "this-checkout")
    models = []
    for layers in mem.layer_counts:
        model_dir = build_model_dir(mem.model, work / "models", layers=layers)
        facts = model_facts(model_dir)
        models.append({"label": f"llama-{facts['parameters'] / 1e6:.0f}M ({layers} layers)", "path": str(model_dir),
                       "parameters": facts["parameters"], "family": True, "layers": layers})
    for path in mem.models:
        facts = model_facts(Path(assets.resolve(path)))
        models.append({"label": Path(path).name.replace("asset:", ""), "path": path, "parameters": facts["parameters"],
                       "family": False})
    rows = []
    for model in models:
        for ds_path in mem.deepspeed_configs:
            name = f"{model['label']}-{Path(ds_path).stem}"
            log(f"bench memory: {model['label']} under {ds_path}")
            run_dir = work / "memory" / slug(name)
            launch(experiment(mem, model["path"], data_dir, ds_path, name), run_dir, mem.ranks, root=root,
                   sample_rss=mem.sample_interval_s)
            row = {"model": model["label"], "parameters": model["parameters"], "family": model["family"],
                   "deepspeed_config": ds_path, "ds": _ds_facts(ds_path), **summarize(read_run(run_dir), cuda)}
            rows.append(row)
            log(f"  largest rank's peak {row['peak'] / 2**30:.2f} GiB (per rank: "
                + ", ".join(f"{p / 2**30:.2f}" for p in row["peak_per_rank"]) + " GiB)")
    budget, budget_what = machine_budget(mem.budget_gib)
    fits = []
    for ds_path in mem.deepspeed_configs:
        points = [(row["parameters"], row["peak"]) for row in rows
                  if row["deepspeed_config"] == ds_path and row["family"] and row["peak"]]
        line = fit(points)
        entry = {"deepspeed_config": ds_path, "points": points}
        if line is not None:
            fixed, slope = line
            entry.update(fixed_bytes=fixed, bytes_per_parameter=slope,
                         largest_parameters=largest_model(fixed, slope, budget, mem.ranks, cuda))
        fits.append(entry)
    return {"device_type": "cuda" if cuda else "cpu", "ranks": mem.ranks, "density": mem.density, "steps": mem.steps,
            "micro_batch_size": mem.micro_batch_size, "max_length": mem.max_length,
            "trainer_root": str(root) if root else None, "budget_bytes": budget, "budget": budget_what,
            "process_baseline_rss_bytes": None if cuda else process_baseline_rss(), "rows": rows, "fits": fits}


def _gib(value) -> str:
    return "–" if value is None else f"{value / 2**30:.2f}"


def _per_rank(values) -> str:
    return "–" if not values else " / ".join(_gib(v) for v in values)


def memory_section(memory: dict) -> list[str]:
    cuda = memory.get("device_type") == "cuda"
    unit = "CUDA max allocated" if cuda else "peak RSS"
    trainer = f" Trainer: `{memory['trainer_root']}`." if memory.get("trainer_root") else ""
    lines = [
        "### Memory per rank: ZeRO-2 vs ZeRO-3 vs ZeRO-3 with offload",
        "",
        f"SIFT {memory['density'] * 100:g}% through the trainer, {memory['ranks']} ranks, micro-batch "
        f"{memory['micro_batch_size']} x {memory['max_length']} tokens, {memory['steps']} steps, per DeepSpeed config. "
        f"{unit} per rank (GiB, rank 0 / rank 1 ...): loading = process start to the selection (model load and, "
        "inside the engine, its setup), selection and steps = the trainer's windows; whole life = sampled by the "
        "bench from /proc over the whole process (with checkpoint and export). Resident: parameter elements the "
        f"rank holds (its ZeRO-3 partition).{trainer}",
        "",
    ]
    header = ["model", "DeepSpeed", "parameters", "resident / rank", "loading", "selection", "steps"]
    if not cuda:
        header.append("whole life")
    header += ["largest rank", "B / parameter", "step (s)"]
    table = []
    floor = memory.get("process_baseline_rss_bytes") or 0
    for row in memory["rows"]:
        resident = row.get("resident_parameter_elements") or []
        cells = [row["model"], Path(row["deepspeed_config"]).stem, f"{row['parameters'] / 1e6:.1f}M",
                 " / ".join(f"{r / 1e6:.1f}M" for r in resident) or "–", _per_rank(row.get("load_peak")),
                 _per_rank(row.get("selection_peak")), _per_rank(row.get("steps_peak"))]
        if not cuda:
            cells.append(_per_rank(row.get("whole_life_rss")))
        per_param = (row["peak"] - (0 if cuda else floor)) / row["parameters"] if row.get("peak") else None
        cells += [_gib(row.get("peak")), "–" if per_param is None else f"{per_param:.1f}",
                  "–" if row.get("step_time_s") is None else f"{row['step_time_s']:.2f}"]
        table.append(cells)
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    if floor and not cuda:
        lines += ["", f"B / parameter: (largest rank's peak - the {floor / 2**30:.2f} GiB an idle process with a rank's "
                  "imports holds) / parameters."]
    fits = [f for f in memory.get("fits", []) if f.get("bytes_per_parameter") is not None]
    if fits:
        where = (f"one GPU ({memory['budget']})" if cuda else
                 f"{memory['ranks']} ranks sharing {memory['budget']}")
        lines += ["", f"Largest trainable model in {where}: the largest rank's peak fitted as fixed + slope x "
                  "parameters over the cost model's depths (same width and vocabulary), solved for the budget "
                  "(an extrapolation along this model family).", ""]
        lines += ["| DeepSpeed | sizes | fixed (GiB) | marginal B / parameter | largest model |", "|---|---|---|---|---|"]
        for entry in fits:
            largest = entry.get("largest_parameters")
            lines.append(f"| {Path(entry['deepspeed_config']).stem} | {len(entry['points'])} | "
                         f"{entry['fixed_bytes'] / 2**30:.2f} | {entry['bytes_per_parameter']:.2f} | "
                         f"{'–' if largest is None else f'{largest / 1e9:.2f}B'} |")
    return lines
