"""Packing: tokens/s and padding share, packed vs padded, through the trainer (launch.sh, DeepSpeed).

Both runs start from the same experiment (the demo: SmolLM2-135M-Instruct, the Alpaca demo corpus) at the same
max_length, and see about the same number of tokens: the packed run's micro-batch (in packed sequences) is the
one whose real tokens come closest to the padded run's, and its step count carries the padded run's token
budget. Real tokens and padding per step are replayed from the datasets and the trainer's data order
(``BatchPlan`` per rank, the experiment's seed), not read from the trainer's own counters, so the numbers do not
depend on how the trainer counts padding. The held-out split is never packed: both runs report the loss over
the same validation examples.
"""

from __future__ import annotations

import statistics

from sift_llm import schema
from sift_llm.bench.config import BenchConfig
from sift_llm.bench.runs import launch, read_run, slug
from sift_llm.config import ExperimentConfig, load_config
from sift_llm.runtime import log


def experiment(cfg: BenchConfig, packing: bool, micro_batch_size: int, steps: int) -> dict:
    """The experiment config (a plain dict) of one run: the base experiment with the bench's overrides."""
    part = cfg.packing
    label = "packed" if packing else "padded"
    base = schema.to_dict(load_config(part.experiment))
    base["name"] = f"bench-packing-{label}"
    base["data"].update({"max_length": part.max_length, "validation_size": part.validation_size, "packing": packing,
                         "output_dir": str(cfg.work / f"packing-data-{label}")})
    base["train"].update({"max_steps": steps, "micro_batch_size": micro_batch_size, "gradient_accumulation_steps": 1,
                          "eval_every": 0, "eval_batches": None, "save_every": 0, "log_every": 1})
    base.pop("output_dir", None)
    return base


def _splits(spec: dict):
    from transformers import AutoTokenizer

    from sift_llm import assets
    from sift_llm.data import load_prepared, prepare

    exp = schema.build(ExperimentConfig, spec)
    prepared = prepare(exp.data, exp.model.path)
    tokenizer = AutoTokenizer.from_pretrained(assets.resolve(exp.model.path))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return exp, prepared, load_prepared(prepared.path), pad_id


def replay(train, micro_batch_size: int, ranks: int, seed: int, steps: int, pad_id: int) -> list[dict]:
    """Real tokens and padded positions of each optimizer step, summed over ranks, as the trainer batches them."""
    from sift_llm.train.batches import BatchPlan, real_tokens

    plans = [BatchPlan(train, micro_batch_size, r, ranks, seed) for r in range(ranks)]
    out = []
    for step in range(steps):
        real = positions = 0
        for plan in plans:
            batch = plan.batch(step, pad_id)
            real += int(real_tokens(batch))
            positions += batch["input_ids"].numel()
        out.append({"real_tokens": real, "positions": positions})
    return out


def _real_per_micro_batch(train, micro_batch_size: int, ranks: int, seed: int, pad_id: int) -> float:
    plan_steps = max(1, (len(train) // ranks) // micro_batch_size)
    steps = replay(train, micro_batch_size, ranks, seed, plan_steps, pad_id)
    return statistics.mean(s["real_tokens"] for s in steps) / ranks


def _row(label: str, run: dict, steps: list[dict], warmup: int, micro_batch_size: int, packing_stats) -> dict:
    timed = [r for r in run["steps"] if r["step"] > warmup] or run["steps"]
    per_step = {r["step"]: r for r in run["steps"]}
    wall = [steps[r["step"] - 1]["real_tokens"] / r["step_time_s"] for r in timed]
    cpu = [steps[r["step"] - 1]["real_tokens"] / r["step_cpu_s"] for r in timed if r.get("step_cpu_s")]
    real, positions = sum(s["real_tokens"] for s in steps), sum(s["positions"] for s in steps)
    evals = {r["step"]: r["eval_loss"] for r in run["evals"]}
    return {
        "label": label, "micro_batch_size": micro_batch_size, "steps": len(steps), "timed_steps": len(timed),
        "tokens": real, "positions": positions, "padding_share": 1 - real / positions,
        "tokens_per_step": real / len(steps),
        "tokens_per_s": statistics.median(wall),
        "tokens_per_cpu_s": statistics.median(cpu) if cpu else None,  # rank 0's process CPU time per step
        "median_step_time_s": statistics.median(per_step[r["step"]]["step_time_s"] for r in timed),
        "step0_eval_loss": evals.get(0), "eval_loss": run["summary"]["eval_loss"],
        "final_train_loss": run["summary"]["final_loss"], "packing": packing_stats,
    }


def run_packing(cfg: BenchConfig) -> dict:
    part = cfg.packing
    padded_spec = experiment(cfg, False, part.padded_micro_batch_size, part.steps)
    padded_exp, _, padded_data, pad_id = _splits(padded_spec)
    ranks, seed = part.ranks, padded_exp.seed
    padded_real = _real_per_micro_batch(padded_data["train"], part.padded_micro_batch_size, ranks, seed, pad_id)
    probe_spec = experiment(cfg, True, 1, part.steps)
    _, packed_prepared, packed_data, _ = _splits(probe_spec)
    row_real = _real_per_micro_batch(packed_data["train"], 1, ranks, seed, pad_id)
    packed_micro = part.packed_micro_batch_size or max(1, round(padded_real / row_real))
    packed_real = _real_per_micro_batch(packed_data["train"], packed_micro, ranks, seed, pad_id)
    packed_steps = max(part.warmup_steps + 1, round(part.steps * padded_real / packed_real))
    log(f"bench packing: padded micro-batch {part.padded_micro_batch_size} ({padded_real:.0f} real tokens), packed "
        f"micro-batch {packed_micro} ({packed_real:.0f}); {part.steps} vs {packed_steps} steps")
    rows = []
    for label, packing, micro, steps, data in (("padded", False, part.padded_micro_batch_size, part.steps, padded_data),
                                               ("packed", True, packed_micro, packed_steps, packed_data)):
        spec = experiment(cfg, packing, micro, steps)
        run_dir = cfg.work / "packing" / slug(label)
        log(f"bench packing: {label}")
        launch(spec, run_dir, ranks)
        run = read_run(run_dir)
        per_step = replay(data["train"], micro, ranks, seed, steps, pad_id)
        row = _row(label, run, per_step, part.warmup_steps, micro, packed_prepared.stats["packing"] if packing else None)
        rows.append(row)
        log(f"  {row['tokens_per_s']:.0f} tokens/s, padding {row['padding_share']:.1%}, held-out loss {row['eval_loss']:.4f}")
    padded, packed = rows
    return {
        "experiment": part.experiment, "max_length": part.max_length, "ranks": ranks,
        "validation_size": part.validation_size, "warmup_steps": part.warmup_steps, "rows": rows,
        "tokens_per_s_ratio": packed["tokens_per_s"] / padded["tokens_per_s"],
        "tokens_per_cpu_s_ratio": (packed["tokens_per_cpu_s"] / padded["tokens_per_cpu_s"]
                                   if packed["tokens_per_cpu_s"] and padded["tokens_per_cpu_s"] else None),
        "eval_loss_difference": packed["eval_loss"] - padded["eval_loss"],
        "goal_ratio": part.goal_ratio,
    }


def packing_section(part: dict) -> list[str]:
    """bench.md's packing section."""
    padded, packed = part["rows"]
    lines = [
        "### Packing: packed vs padded through the trainer",
        "",
        f"`{part['experiment']}` at max_length {part['max_length']}, {part['ranks']} ranks through `launch.sh`; both runs "
        f"see about the same tokens ({padded['tokens']:,} padded, {packed['tokens']:,} packed). tokens/s: median over "
        f"steps after {part['warmup_steps']} warm-up steps of real (non-padding) tokens per step, replayed from the "
        "dataset and the trainer's data order, over the step's wall time (tokens/CPU-s: over rank 0's process CPU "
        "time). Held-out loss: the same validation examples (never packed) after the last step.",
        "",
        "| run | micro-batch | steps | tokens/step | padding share | tokens/s | tokens/CPU-s | held-out loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in part["rows"]:
        cpu = f"{row['tokens_per_cpu_s']:.0f}" if row.get("tokens_per_cpu_s") else "–"
        lines.append(f"| {row['label']} | {row['micro_batch_size']} | {row['steps']} | {row['tokens_per_step']:.0f} | "
                     f"{row['padding_share']:.1%} | {row['tokens_per_s']:.0f} | {cpu} | {row['eval_loss']:.4f} |")
    met = "met" if part["tokens_per_s_ratio"] >= part["goal_ratio"] else "**missed**"
    cpu_ratio = part.get("tokens_per_cpu_s_ratio")
    lines += ["", f"Packed / padded tokens/s: **{part['tokens_per_s_ratio']:.2f}x** (goal >= {part['goal_ratio']:g}x: "
              f"{met})" + (f"; tokens per CPU-second {cpu_ratio:.2f}x" if cpu_ratio else "")
              + f". Held-out loss difference (packed - padded): {part['eval_loss_difference']:+.4f}."]
    if packed.get("packing"):
        stats = packed["packing"]
        lines += ["", f"Packing: {stats['examples']} train examples in {stats['sequences']} sequences "
                  f"({stats['examples_per_sequence']} per sequence, {stats['fill']:.1%} full)."]
    return lines
