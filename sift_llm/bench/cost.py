"""Cost of training, measured through the real trainer: launch.sh, DeepSpeed, N ranks, methods alternated.

Per method: peak RSS (CPU) or CUDA max allocated per rank over the training steps, median step time and
tokens/s over the timed steps (after warm-up, pooled over rounds), bytes passed to collectives per step,
the selection pass (SIFT), and trainable-state bytes measured inside a 1-rank DeepSpeed engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from sift_llm import assets
from sift_llm.bench.common import lora_count, matching_lora_rank, median, sift_count, target_shapes
from sift_llm.bench.config import BenchConfig, CostConfig, ModelShape
from sift_llm.bench.runs import launch, method_section, read_run, slug
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir
from sift_llm.runtime import log


def _llama_config(shape: ModelShape, vocab: int, layers: int | None = None, tokenizer=None):
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers or shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048, tie_word_embeddings=False,
    )
    if tokenizer is not None:
        config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        config.pad_token_id = tokenizer.pad_token_id
    return config


def build_model_dir(shape: ModelShape, root: Path, layers: int | None = None) -> Path:
    """A randomly initialised LLaMA of ``shape`` (fp32 safetensors + the tokenizer), built once and cached."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    layers = layers or shape.layers
    key = f"llama-h{shape.hidden}-i{shape.intermediate}-l{layers}-a{shape.heads}-kv{shape.kv_heads}-s{shape.seed}"
    out = root / key
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(shape.tokenizer))
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(_llama_config(shape, len(tokenizer), layers, tokenizer))
    log(f"bench: writing a random {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M-parameter model to {out}")
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def model_facts(model_dir: Path) -> dict:
    """Parameter count and SIFT/LoRA target shapes of an HF model directory (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = target_shapes(model)
    return {"parameters": sum(p.numel() for p in model.parameters()), "shapes": shapes,
            "targeted_entries": sum(o * i for o, i in shapes)}


def plan(cost: CostConfig, shapes: list[tuple[int, int]]) -> list[dict]:
    """The variants of one round, in order: SIFT densities, SIFT with the previous kernels, LoRA, full."""
    out = [{"label": f"sift-{d * 100:g}%", "method": "sift", "density": d} for d in cost.sift_densities]
    out += [{"label": f"sift-{d * 100:g}% (global)", "method": "sift", "density": d, "scope": "global"}
            for d in cost.sift_global_densities]
    if cost.before_kernels_density is not None:
        d = cost.before_kernels_density
        out.append({"label": f"sift-{d * 100:g}% (before)", "method": "sift", "density": d, "before": True})
    r = matching_lora_rank(shapes, cost.lora_match_density)
    out.append({"label": f"lora-r{r}", "method": "lora", "r": r})
    if cost.full:
        out.append({"label": "full", "method": "full"})
    for variant in out:
        if variant["method"] == "sift" and variant.get("scope") != "global":  # global: the selection's count
            variant["trainable"] = sift_count(shapes, variant["density"])
        elif variant["method"] == "lora":
            variant["trainable"] = lora_count(shapes, variant["r"])
    return out


def _with_full_count(variants: list[dict], parameters: int) -> list[dict]:
    for variant in variants:
        if variant["method"] == "full":
            variant["trainable"] = parameters
    return variants


def experiment(cost: CostConfig, model_dir: Path, data_dir: Path, variant: dict) -> dict:
    steps = cost.warmup_steps + cost.timed_steps
    return {
        "name": f"bench-{slug(variant['label'])}",
        "seed": 42,
        "model": {"path": str(model_dir), "gradient_checkpointing": cost.gradient_checkpointing},
        "data": {"path": cost.data, "format": "alpaca", "max_length": cost.max_length, "validation_size": 8,
                 "output_dir": str(data_dir)},
        "method": method_section(variant),
        "train": {"max_steps": steps, "micro_batch_size": cost.micro_batch_size, "learning_rate": 1e-5,
                  "lr_scheduler": "constant", "warmup_ratio": 0.0, "eval_batches": 1, "log_every": 1,
                  "precision": "auto"},
        "deepspeed": {"config": cost.deepspeed_config},
    }


def summarize_run(run: dict, warmup: int) -> dict:
    """Per-run numbers: timed steps, per-rank peak memory, bytes per collective per step, selection."""
    timed = [r for r in run["steps"] if r["step"] > warmup]
    if not timed:
        raise UserError("bench: no timed steps in a run (increase cost.timed_steps)")
    out = {
        "step_times_s": [r["step_time_s"] for r in timed],
        "tokens_per_s": [r["tokens_per_s"] for r in timed],
        "cpu_times_s": [r["step_cpu_s"] for r in timed if "step_cpu_s" in r],
        "peak_rss_bytes": run["summary"]["peak_memory"].get("rss_peak_bytes"),
        "cuda_max_allocated_bytes": run["summary"]["peak_memory"].get("cuda_max_allocated_bytes"),
    }
    collectives: dict[str, list[int]] = {}
    for record in timed:
        for name, count in (record.get("collective_bytes") or {}).items():
            collectives.setdefault(name, []).append(count)
    out["collective_bytes"] = {name: median(counts) for name, counts in collectives.items()}
    selection = run.get("selection")
    if selection:
        out["selection"] = {
            "wall_s": selection.get("wall_seconds"),
            "calibration_s": selection["calibration_seconds"],
            "finalize_s": selection["finalize_seconds"],
            "peak_rss_bytes": selection.get("peak_memory", {}).get("rss_peak_bytes"),
            "load_peak_rss_bytes": selection.get("load_peak_memory", {}).get("rss_peak_bytes"),
            "cuda_max_allocated_bytes": selection.get("peak_memory", {}).get("cuda_max_allocated_bytes"),
            "selected": selection["selected"],
            "grad_sq_share": selection["grad_sq_share"],
        }
    return out


def combine(variant: dict, runs: list[dict]) -> dict:
    """One row per variant from its rounds: pooled medians for time, the largest peak for memory."""

    def worst(key: str) -> int | None:
        values = [max(v for v in run[key] if v is not None) for run in runs if run.get(key) and any(run[key])]
        return max(values) if values else None

    step_times = [t for run in runs for t in run["step_times_s"]]
    row = {
        "label": variant["label"], "method": variant["method"], "before": bool(variant.get("before")),
        "trainable": variant.get("trainable"), "density": variant.get("density"), "lora_r": variant.get("r"),
        "step_time_s": median(step_times), "step_times_s": step_times,
        "round_step_time_s": [median(run["step_times_s"]) for run in runs],
        "tokens_per_s": median(t for run in runs for t in run["tokens_per_s"]),
        "step_cpu_s": median(t for run in runs for t in run.get("cpu_times_s", [])),
        "load_average": [run.get("load_average") for run in runs],
        "peak_rss_bytes": worst("peak_rss_bytes"),
        "peak_rss_bytes_per_rank": runs[-1]["peak_rss_bytes"],
        "cuda_max_allocated_bytes": worst("cuda_max_allocated_bytes"),
        "collective_bytes": {
            name: median(run["collective_bytes"].get(name) for run in runs) for name in runs[0]["collective_bytes"]
        },
    }
    selections = [run["selection"] for run in runs if "selection" in run]
    if selections:
        row["selection"] = {
            **selections[-1],
            "wall_s": median(s["wall_s"] for s in selections),
            "round_wall_s": [s["wall_s"] for s in selections],
            "calibration_s": median(s["calibration_s"] for s in selections),
            "finalize_s": median(s["finalize_s"] for s in selections),
            "peak_rss_bytes": max(max(s["peak_rss_bytes"] or [0]) for s in selections),
        }
        cuda = [max(s["cuda_max_allocated_bytes"]) for s in selections if s.get("cuda_max_allocated_bytes")]
        row["selection"]["cuda_max_allocated_bytes"] = max(cuda) if cuda else None
        if row["trainable"] is None:
            row["trainable"] = selections[-1]["selected"]
    return row


def run_probe(cfg: BenchConfig, model_dir: Path, variants: list[dict]) -> dict:
    """Trainable-state bytes per method, measured in a 1-rank DeepSpeed engine (one subprocess)."""
    request = {"model_dir": str(model_dir), "deepspeed_config": cfg.cost.deepspeed_config,
               "variants": [v for v in variants if not v.get("before")]}
    out = cfg.work / "state_probe.json"
    command = [sys.executable, "-m", "sift_llm.bench.probe", json.dumps(request), str(out)]
    log_path = cfg.work / "state_probe.log"
    with open(log_path, "w") as handle:
        result = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=1800)
    if result.returncode != 0:
        raise UserError(f"bench: the state probe failed:\n{log_path.read_text(errors='replace')[-3000:]}")
    return json.loads(out.read_text())


BASELINE_PROBE = (
    "import deepspeed, peft, torch, transformers, sift_llm.train.trainer\n"
    "print([int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmRSS:')][0])"
)


def process_baseline_rss() -> int | None:
    """RSS of an idle process that imported what a training rank imports (no model): the floor every method pays."""
    try:
        out = subprocess.run([sys.executable, "-c", BASELINE_PROBE], capture_output=True, text=True, timeout=600)
        return int(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        return None


def run_cost(cfg: BenchConfig) -> dict:
    cost = cfg.cost
    work = cfg.work
    model_dir = build_model_dir(cost.model, work / "models")
    facts = model_facts(model_dir)
    variants = _with_full_count(plan(cost, facts["shapes"]), facts["parameters"])
    data_dir = work / "cost-data"
    runs: dict[str, list[dict]] = {v["label"]: [] for v in variants}
    for round_index in range(cost.rounds):
        # Odd rounds run in reverse so that drift over the invocation hits every method alike.
        order = variants if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            log(f"bench cost, round {round_index + 1}/{cost.rounds}: {variant['label']}")
            run_dir = work / "cost" / slug(variant["label"]) / f"round{round_index + 1}"
            launch(experiment(cost, model_dir, data_dir, variant), run_dir, cost.ranks)
            summary = summarize_run(read_run(run_dir), cost.warmup_steps)
            summary["load_average"] = round(os.getloadavg()[0], 2)  # other work on the machine during the run
            runs[variant["label"]].append(summary)
            log(f"  median step {median(summary['step_times_s']):.3f} s, peak RSS "
                f"{max(summary['peak_rss_bytes']) / 2**30:.2f} GiB")
    rows = [combine(v, runs[v["label"]]) for v in variants]
    result = {
        "model": {"dir": str(model_dir), "parameters": facts["parameters"], "targeted_entries": facts["targeted_entries"],
                  **{k: getattr(cost.model, k) for k in ("hidden", "intermediate", "layers", "heads", "kv_heads")}},
        "ranks": cost.ranks, "micro_batch_size": cost.micro_batch_size, "max_length": cost.max_length,
        "warmup_steps": cost.warmup_steps, "timed_steps": cost.timed_steps, "rounds": cost.rounds,
        "deepspeed_config": cost.deepspeed_config, "device_type": "cuda" if torch.cuda.is_available() else "cpu",
        "rows": rows,
        "process_baseline_rss_bytes": process_baseline_rss(),
    }
    if cost.state_probe:
        probe_dir = build_model_dir(cost.model, work / "models", layers=cost.probe_layers)
        probe_shapes = model_facts(probe_dir)["shapes"]
        probe_variants = []
        for v in variants:
            if v.get("before"):
                continue
            p = dict(v)
            if p["method"] == "sift":
                p["trainable"] = sift_count(probe_shapes, p["density"])
            elif p["method"] == "lora":
                p["trainable"] = lora_count(probe_shapes, p["r"])
            probe_variants.append(p)
        result["state_probe"] = {"model_layers": cost.probe_layers, **run_probe(cfg, probe_dir, probe_variants)}
    return result
