"""SIFT on a 4-bit base vs QLoRA vs SIFT on the full-precision base, through the trainer on the demo.

Three runs of the same experiment (the demo: SmolLM2-135M-Instruct on the Alpaca demo corpus), same data order,
batch, steps and learning rate, through ``launch.sh`` and DeepSpeed as a user starts them:

- ``qlora-<fmt> r<r>``: LoRA on the 4-bit base (``model.quantization``) at the rank whose parameter count is
  nearest SIFT's at ``density`` (QLoRA);
- ``sift-<fmt>``: SIFT on the same 4-bit base with exactly QLoRA's parameter count (``method.sift.budget``);
- ``sift`` (full precision): the same SIFT on the unquantized base.

Per run: the peak resident set (or CUDA max allocated) of each rank over the training loop, the median step
time after ``warmup_steps``, and the held-out loss over every validation example after the last step. The
ratios against QLoRA are taken within each round (runs alternated, odd rounds reversed) and their median is
reported, so drift in the machine's load hits every run alike.

In this process the part also measures what the memory table for large models needs: the trainable state per
SIFT entry (``sift_llm.sift.memory.trainable_state_report`` on the 4-bit model's real layers, plain fp32 and
DeepSpeed bf16 with an fp32 master) and the 4-bit weights' bytes per entry (packed codes plus block scales);
:func:`memory_table` turns them into the memory LLaMA-7B and LLaMA-70B need for SIFT on a 4-bit base.
"""

from __future__ import annotations

import statistics

import torch

from sift_llm import assets
from sift_llm.bench.common import lora_count, matching_lora_rank, median
from sift_llm.bench.config import BenchConfig
from sift_llm.bench.runs import launch, read_run, slug
from sift_llm.errors import UserError
from sift_llm.runtime import log

# LLaMA shapes for the memory table: (hidden, MLP, layers, key/value width, vocabulary). 70B uses grouped-query
# attention (8 key/value heads of 128). Embeddings and lm_head are untied in both.
LLAMA_SHAPES = {
    "LLaMA-7B": {"hidden": 4096, "intermediate": 11008, "layers": 32, "kv": 4096, "vocab": 32000},
    "LLaMA-70B": {"hidden": 8192, "intermediate": 28672, "layers": 80, "kv": 1024, "vocab": 32000},
}
TABLE_DENSITIES = (0.01, 0.05)


def plan(cfg: BenchConfig, shapes: list[tuple[int, int]]) -> list[dict]:
    """The runs of one round. QLoRA takes the rank whose parameter count is nearest SIFT's at ``density``; both
    SIFT runs then get exactly that many entries (``method.sift.budget``), so the three train equal counts."""
    part = cfg.quantized
    fmt = part.quantization
    if fmt not in ("nf4", "fp4"):
        raise UserError(f"quantized.quantization: expected nf4 or fp4, got {fmt!r}")
    r = matching_lora_rank(shapes, part.density)
    count = lora_count(shapes, r)
    density = count / sum(o * i for o, i in shapes)
    sift = {"method": "sift", "density": density, "budget": count, "trainable": count}
    out = [
        {"label": f"sift-{fmt} {density * 100:.2g}%", **sift, "quantization": fmt},
        {"label": f"qlora-{fmt} r{r}", "method": "lora", "r": r, "quantization": fmt, "trainable": count},
    ]
    if part.full_precision:
        out.append({"label": f"sift {density * 100:.2g}% (full-precision base)", **sift, "quantization": "none"})
    for lr in part.qlora_extra_lrs:
        out.append({"label": f"qlora-{fmt} r{r} (lr {lr:g})", "method": "lora", "r": r, "quantization": fmt,
                    "trainable": count, "lr": lr})
    return out


def experiment(cfg: BenchConfig, variant: dict) -> dict:
    """The experiment config (a plain dict): the part's experiment with the bench's overrides."""
    from sift_llm import schema
    from sift_llm.config import load_config

    part = cfg.quantized
    base = schema.to_dict(load_config(part.experiment))
    base["name"] = f"bench-quantized-{slug(variant['label'])}"
    base["model"]["quantization"] = variant["quantization"]
    base["data"].update({"max_length": part.max_length, "validation_size": part.validation_size,
                         "output_dir": str(cfg.work / "quantized-data")})
    base["method"]["name"] = variant["method"]
    if variant["method"] == "sift":
        base["method"]["sift"].update({"density": variant["density"], "budget": variant["budget"]})
    else:
        base["method"]["lora"].update({"r": variant["r"], "alpha": 2.0 * variant["r"]})
    base["train"].update({"max_steps": part.steps, "micro_batch_size": part.micro_batch_size,
                          "gradient_accumulation_steps": 1, "learning_rate": variant.get("lr", part.learning_rate),
                          "eval_every": part.eval_every, "eval_batches": None, "save_every": 0, "log_every": 1,
                          "save_merged": False})
    base["deepspeed"] = {"config": part.deepspeed_config, "overrides": {}}
    base.pop("output_dir", None)
    return base


def _peak(summary: dict) -> tuple[int | None, int | None]:
    """(largest rank's peak RSS, largest rank's CUDA max allocated) over the training loop; the summary holds
    ``{key: [rank 0, rank 1, ...]}``."""
    peaks = summary.get("peak_memory") or {}

    def largest(key):
        values = peaks.get(key)
        values = values if isinstance(values, list) else [values]
        values = [v for v in values if v]
        return max(values) if values else None

    return largest("rss_peak_bytes"), largest("cuda_max_allocated_bytes")


def summarize(run: dict, warmup: int) -> dict:
    timed = [r for r in run["steps"] if r["step"] > warmup] or run["steps"]
    rss, cuda = _peak(run["summary"])
    evals = {r["step"]: r["eval_loss"] for r in run["evals"]}
    return {"step_times_s": [r["step_time_s"] for r in timed], "step_time_s": median(r["step_time_s"] for r in timed),
            "step_cpu_s": median(r["step_cpu_s"] for r in timed if r.get("step_cpu_s")),
            "peak_rss_bytes": rss, "cuda_max_allocated_bytes": cuda, "eval_loss": run["summary"]["eval_loss"],
            "step0_eval_loss": evals.get(0), "eval_curve": sorted([s, v] for s, v in evals.items() if s > 0),
            "final_train_loss": run["summary"]["final_loss"],
            "selected": (run.get("selection") or {}).get("selected")}


def memory_of(row: dict) -> int | None:
    return row.get("cuda_max_allocated_bytes") or row.get("peak_rss_bytes")


def measure_state(model_dir, density: float, quantization: str) -> dict:
    """Per-entry trainable state and 4-bit weight bytes, measured on the real model loaded in 4 bits."""
    from transformers import AutoModelForCausalLM

    from sift_llm.loading import keep_4bit_layout, quantization_kwargs
    from sift_llm.sift import SiftConfig, attach_sift
    from sift_llm.sift.layer import is_4bit

    def load():
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **quantization_kwargs(
            quantization, True, torch.float32, torch.uint8, torch.device("cpu")))
        keep_4bit_layout(model)
        return model

    model = load()
    quantized = [m for m in model.modules() if is_4bit(m)]
    entries = sum(m.in_features * m.out_features for m in quantized)
    packed = sum(m.weight.numel() * m.weight.element_size() for m in quantized)
    scales = 0
    for module in quantized:
        state = module.weight.quant_state
        for tensor in (state.absmax, state.code, getattr(state, "offset", None)):
            if torch.is_tensor(tensor):
                scales += tensor.numel() * tensor.element_size()
        if state.state2 is not None:
            scales += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code))
    weights = {id(m.weight) for m in quantized}
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in weights)
    out = {"quantized_entries": entries, "packed_bytes": packed, "scale_bytes": scales,
           "bits_per_weight": 8 * (packed + scales) / entries, "other_parameter_bytes_fp32": other}
    for label, values_dtype, master in (("fp32", "float32", None), ("bf16_master_fp32", "bfloat16", torch.float32)):
        handle = attach_sift(model, SiftConfig(density=density, values_dtype=values_dtype))
        sparse = handle.memory_report(master_dtype=master).total("sparse")
        out[f"state_{label}"] = {"entries": sparse.entries, "state_bytes": sparse.state_bytes,
                                 "bytes_per_entry": sparse.bytes_per_entry,
                                 "index_bytes_per_entry": sparse.index_bytes / max(sparse.entries, 1),
                                 "gradient_bytes_per_entry": sparse.gradient_bytes / max(sparse.entries, 1)}
        del handle
        model = load()
    return out


def llama_entries(shape: dict) -> tuple[int, int]:
    """(entries of the q/k/v/o/gate/up/down matrices, other parameters: embeddings, lm_head, norms)."""
    h, f, kv = shape["hidden"], shape["intermediate"], shape["kv"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * f
    other = 2 * shape["vocab"] * h + (2 * shape["layers"] + 1) * h
    return per_layer * shape["layers"], other


def memory_table(state: dict) -> list[dict]:
    """Memory LLaMA-7B/70B need for SIFT on a 4-bit base at 1% and 5%, from the measured per-entry costs.

    Weights: targeted matrices at the measured 4-bit bytes per weight, the rest (embeddings, lm_head, norms)
    in bf16. Trainable state: DeepSpeed bf16 with an fp32 master (values, master, Adam m and v, index) per
    entry; gradient: the bf16 values' gradient plus DeepSpeed's fp32 partition (transient). Activations are
    left out, as in the SIFT paper's Table 1. Columns for comparison: the same SIFT on a bf16 base, and QLoRA
    at the same trainable count (no index; fp32 master and Adam).
    """
    bits = state["bits_per_weight"]
    per_entry = state["state_bf16_master_fp32"]["bytes_per_entry"]
    index = state["state_bf16_master_fp32"]["index_bytes_per_entry"]
    grad = 2 + 4
    rows = []
    for name, shape in LLAMA_SHAPES.items():
        targeted, other = llama_entries(shape)
        base4 = targeted * bits / 8 + other * 2
        for density in TABLE_DENSITIES:
            k = round(density * targeted)
            sift_state = k * per_entry
            total = base4 + sift_state + k * grad
            rows.append({
                "model": name, "density": density, "targeted_entries": targeted, "trainable": k,
                "base_4bit_bytes": base4, "state_bytes": sift_state, "gradient_bytes": k * grad, "total_bytes": total,
                "bf16_base_total_bytes": (targeted + other) * 2 + sift_state + k * grad,
                "qlora_equal_total_bytes": base4 + k * (per_entry - index) + k * grad,
            })
    return rows


def run_quantized(cfg: BenchConfig) -> dict:
    from sift_llm.bench.cost import model_facts, process_baseline_rss

    part = cfg.quantized
    probe = experiment(cfg, {"label": "probe", "method": "lora", "r": 1, "quantization": "none"})
    model_dir = assets.resolve(probe["model"]["path"])
    facts = model_facts(model_dir)
    variants = plan(cfg, facts["shapes"])
    runs: dict[str, list[dict]] = {v["label"]: [] for v in variants}
    for round_index in range(part.rounds):
        order = variants if round_index % 2 == 0 else list(reversed(variants))
        for variant in order:
            log(f"bench quantized, round {round_index + 1}/{part.rounds}: {variant['label']}")
            run_dir = cfg.work / "quantized" / slug(variant["label"]) / f"round{round_index + 1}"
            launch(experiment(cfg, variant), run_dir, part.ranks)
            summary = summarize(read_run(run_dir), part.warmup_steps)
            runs[variant["label"]].append(summary)
            memory = memory_of(summary)
            log(f"  median step {summary['step_time_s']:.3f} s, peak "
                f"{memory / 2**20 if memory else float('nan'):.0f} MiB, held-out loss {summary['eval_loss']:.4f}")
    rows = []
    for variant in variants:
        done = runs[variant["label"]]
        rows.append({
            "label": variant["label"], "method": variant["method"], "quantization": variant["quantization"],
            "lr": variant.get("lr", part.learning_rate),
            "density": variant.get("density"), "lora_r": variant.get("r"),
            "trainable": done[-1]["selected"] or variant["trainable"],
            "step_time_s": median(t for run in done for t in run["step_times_s"]),
            "round_step_time_s": [run["step_time_s"] for run in done],
            "step_cpu_s": median(run["step_cpu_s"] for run in done),
            "peak_rss_bytes": max((run["peak_rss_bytes"] or 0) for run in done) or None,
            "cuda_max_allocated_bytes": max((run["cuda_max_allocated_bytes"] or 0) for run in done) or None,
            "eval_loss": statistics.mean(run["eval_loss"] for run in done),
            "eval_losses": [run["eval_loss"] for run in done],
            "step0_eval_loss": done[0]["step0_eval_loss"], "eval_curve": done[-1]["eval_curve"],
            "final_train_loss": done[-1]["final_train_loss"],
        })
    sift4, qlora = rows[0], rows[1]
    per_round_time = [a["step_time_s"] / b["step_time_s"] for a, b in zip(runs[sift4["label"]], runs[qlora["label"]])]
    baseline = process_baseline_rss()
    ratios = {
        "memory": memory_of(sift4) / memory_of(qlora) if memory_of(sift4) and memory_of(qlora) else None,
        "step_time": median(per_round_time),
        "eval_loss_difference": sift4["eval_loss"] - qlora["eval_loss"],
    }
    if baseline and not sift4.get("cuda_max_allocated_bytes") and memory_of(qlora):
        ratios["memory_above_baseline"] = (memory_of(sift4) - baseline) / (memory_of(qlora) - baseline)
    log("bench quantized: measuring the per-entry state and the 4-bit weight size")
    state = measure_state(model_dir, part.density, part.quantization)
    return {
        "experiment": part.experiment, "model": str(model_dir), "parameters": facts["parameters"],
        "targeted_entries": facts["targeted_entries"], "steps": part.steps, "ranks": part.ranks,
        "micro_batch_size": part.micro_batch_size, "max_length": part.max_length,
        "validation_size": part.validation_size, "warmup_steps": part.warmup_steps, "rounds": part.rounds,
        "learning_rate": part.learning_rate, "deepspeed_config": part.deepspeed_config,
        "device_type": "cuda" if torch.cuda.is_available() else "cpu", "process_baseline_rss_bytes": baseline,
        "rows": rows, "ratios": ratios, "goals": {"memory": part.memory_goal, "step_time": part.step_time_goal},
        "state": state, "memory_table": memory_table(state),
    }


def _mib(value) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f} MiB"


def _gib(value) -> str:
    return f"{value / 2**30:.1f} GiB"


def quantized_section(part: dict) -> list[str]:
    """bench.md's section: the three runs, the ratios against QLoRA, and the large-model memory table."""
    cuda = part.get("device_type") == "cuda"
    memory_name = "CUDA max allocated" if cuda else "peak RSS (largest rank)"
    lines = [
        "### SIFT on a 4-bit base vs QLoRA",
        "",
        f"`{part['experiment']}` ({part['parameters'] / 1e6:.0f}M parameters), {part['ranks']} ranks through "
        f"`launch.sh` (`{part['deepspeed_config']}`), {part['micro_batch_size']} examples x {part['max_length']} "
        f"tokens per rank, {part['steps']} steps at lr {part['learning_rate']:g}, {part['rounds']} round(s). Memory: "
        f"{memory_name} over the training loop (the process baseline of Python, torch and DeepSpeed included"
        + (f"; an idle process with those imports holds {_mib(part['process_baseline_rss_bytes'])}"
           if part.get("process_baseline_rss_bytes") and not cuda else "")
        + f"). Step time: median after {part['warmup_steps']} warm-up steps. Held-out loss: all "
        f"{part['validation_size']} validation examples after the last step.",
        "",
        f"| run | base | trainable | {memory_name} | x QLoRA | step time (s) | x QLoRA | held-out loss | vs QLoRA |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    qlora = part["rows"][1]
    for row in part["rows"]:
        memory, ref = memory_of(row), memory_of(qlora)
        lines.append(
            f"| {row['label']} | {row['quantization'] if row['quantization'] != 'none' else 'full precision'} | "
            f"{row['trainable']:,} | {_mib(memory)} | {memory / ref:.3f} | {row['step_time_s']:.3f} | "
            f"{row['step_time_s'] / qlora['step_time_s']:.3f} | {row['eval_loss']:.4f} | "
            f"{row['eval_loss'] - qlora['eval_loss']:+.4f} |"
        )
    ratios, goals = part["ratios"], part["goals"]

    def verdict(value, goal):
        return "met" if value is not None and value <= goal else "**missed**"

    base_loss = part["rows"][0].get("step0_eval_loss")
    lines += [
        "",
        f"SIFT-4bit / QLoRA: memory **{ratios['memory']:.3f}x** (goal <= {goals['memory']:g}x: "
        f"{verdict(ratios['memory'], goals['memory'])})"
        + (f", above the process baseline {ratios['memory_above_baseline']:.3f}x" if ratios.get("memory_above_baseline")
           else "")
        + f"; step time **{ratios['step_time']:.3f}x** (goal <= {goals['step_time']:g}x: "
        f"{verdict(ratios['step_time'], goals['step_time'])}); held-out loss difference "
        f"**{ratios['eval_loss_difference']:+.4f}** (goal <= 0: {verdict(ratios['eval_loss_difference'], 0.0)})"
        + (f"; untrained 4-bit base {base_loss:.4f}." if base_loss is not None else "."),
    ]
    state = part["state"]
    per = state["state_bf16_master_fp32"]
    lines += [
        "",
        f"Measured on the 4-bit model: {state['bits_per_weight']:.3f} bits per 4-bit weight (packed codes "
        f"{8 * state['packed_bytes'] / state['quantized_entries']:.0f} bits plus block scales); SIFT state "
        f"{state['state_fp32']['bytes_per_entry']:.0f} B per entry in plain fp32 and {per['bytes_per_entry']:.0f} B "
        f"under DeepSpeed bf16 with an fp32 master ({per['index_bytes_per_entry']:.0f} B of it the int32 index).",
        "",
        "Memory for SIFT on an NF4 base (weights + trainable state + the transient values' gradient; activations "
        "left out, as in the SIFT paper's Table 1), computed from those measurements:",
        "",
        "| model | density | trainable | 4-bit base | SIFT state | gradient | total | SIFT on a bf16 base | "
        "QLoRA, same count |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in part["memory_table"]:
        lines.append(
            f"| {row['model']} | {row['density'] * 100:g}% | {row['trainable'] / 1e6:,.0f}M | "
            f"{_gib(row['base_4bit_bytes'])} | {_gib(row['state_bytes'])} | {_gib(row['gradient_bytes'])} | "
            f"**{_gib(row['total_bytes'])}** | {_gib(row['bf16_base_total_bytes'])} | "
            f"{_gib(row['qlora_equal_total_bytes'])} |"
        )
    return lines
