"""Quality: held-out loss after the same number of steps, same data and batch, per method (the demo setup).

The base model's held-out loss is measured once in this process over the same validation examples the
trainer evaluates (all of them), so every method's loss reduction, and the share of full fine-tuning's
reduction that SIFT recovers, come from the same invocation.
"""

from __future__ import annotations

import torch

from sift_llm import assets
from sift_llm.bench.common import lora_count, matching_lora_rank, sift_count
from sift_llm.bench.config import BenchConfig, QualityConfig
from sift_llm.bench.cost import model_facts
from sift_llm.bench.runs import finished, launch, method_section, read_run, slug
from sift_llm.config import load_config
from sift_llm.runtime import log


def plan(quality: QualityConfig, shapes: list[tuple[int, int]]) -> list[dict]:
    out = [{"label": f"sift-{d * 100:g}%", "method": "sift", "density": d, "lr": quality.sift_lr,
            "trainable": sift_count(shapes, d)} for d in quality.sift_densities]
    for d in quality.lora_match_densities:
        r = matching_lora_rank(shapes, d)
        for i, lr in enumerate([quality.lora_lr, *quality.extra_lora_lrs]):
            out.append({"label": f"lora-r{r}" + (f" (lr {lr:g})" if i else ""), "method": "lora", "r": r, "lr": lr,
                        "trainable": lora_count(shapes, r), "matches": f"sift-{d * 100:g}%"})
    if quality.full:
        out.append({"label": "full", "method": "full", "lr": quality.full_lr, "trainable": None})
        for lr in quality.extra_full_lrs:
            out.append({"label": f"full (lr {lr:g})", "method": "full", "lr": lr, "trainable": None})
    return out


def experiment(cfg: BenchConfig, variant: dict) -> dict:
    """The quality experiment config as a plain dict: the base experiment with the bench's overrides."""
    from sift_llm import schema

    quality = cfg.quality
    base = schema.to_dict(load_config(quality.experiment))
    base["name"] = f"bench-quality-{slug(variant['label'])}"
    base["data"].update({"max_length": quality.max_length, "validation_size": quality.validation_size,
                         "output_dir": str(cfg.work / "quality-data")})
    method = method_section(variant)
    base["method"]["name"] = method["name"]
    for key in ("sift", "lora"):
        base["method"][key].update(method.get(key, {}))
    base["train"].update({"max_steps": quality.steps, "micro_batch_size": quality.micro_batch_size,
                          "learning_rate": variant["lr"], "eval_every": quality.eval_every, "eval_batches": None,
                          "save_every": 0, "log_every": 1})
    base.pop("output_dir", None)
    return base


def base_loss(cfg: BenchConfig, experiment_dict: dict) -> dict:
    """Token-weighted held-out loss of the untrained model over every validation example (one process)."""
    from sift_llm import schema
    from sift_llm.config import ExperimentConfig
    from sift_llm.data import load_prepared, prepare
    from sift_llm.data.encode import IGNORE_INDEX
    from sift_llm.loading import load_model
    from sift_llm.train.batches import BatchPlan

    exp = schema.build(ExperimentConfig, experiment_dict)
    prepared = prepare(exp.data, exp.model.path)
    validation = load_prepared(prepared.path)["validation"]
    model_dir = assets.resolve(exp.model.path)
    model, tokenizer, _ = load_model(model_dir, device="cpu", dtype="float32")  # eval mode
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = BatchPlan(validation, exp.train.micro_batch_size, 0, 1, exp.seed, shuffle=False)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for index in range(batches.micro_batches_per_epoch):
            batch = batches.batch(index, pad_id)
            count = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss_sum += float(model(**batch).loss) * count
            tokens += count
    return {"eval_loss": loss_sum / tokens, "examples": len(validation), "tokens": tokens}


def run_quality(cfg: BenchConfig) -> dict:
    quality = cfg.quality
    probe = experiment(cfg, {"label": "probe", "method": "full", "lr": quality.full_lr})
    model_dir = assets.resolve(probe["model"]["path"])
    facts = model_facts(model_dir)
    variants = plan(quality, facts["shapes"])
    rows = []
    for variant in variants:
        log(f"bench quality: {variant['label']}")
        run_dir = cfg.work / "quality" / slug(variant["label"])
        spec = experiment(cfg, variant)
        if finished(run_dir, spec):
            log("  reusing the finished run (same experiment; delete it to train again)")
        else:
            launch(spec, run_dir, quality.ranks)
        run = read_run(run_dir)
        row = {"label": variant["label"], "method": variant["method"], "lr": variant["lr"],
               "trainable": variant["trainable"] or facts["parameters"], "density": variant.get("density"),
               "lora_r": variant.get("r"), "matches": variant.get("matches"),
               "eval_curve": [[r["step"], r["eval_loss"]] for r in run["evals"] if r["step"] > 0],
               "step0_eval_loss": next((r["eval_loss"] for r in run["evals"] if r["step"] == 0), None),
               "eval_loss": run["summary"]["eval_loss"], "final_train_loss": run["summary"]["final_loss"],
               "train_curve": [[r["step"], r["loss"]] for r in run["steps"]],
               "median_step_time_s": sorted(r["step_time_s"] for r in run["steps"])[len(run["steps"]) // 2]}
        if "selection" in run:
            row["selected"] = run["selection"]["selected"]
            row["grad_sq_share"] = run["selection"]["grad_sq_share"]
            row["trainable"] = run["selection"]["selected"]
        rows.append(row)
        log(f"  held-out loss {row['eval_loss']:.4f}")
    base = base_loss(cfg, probe)
    log(f"bench quality: base model held-out loss {base['eval_loss']:.4f}")
    return {"model": str(model_dir), "parameters": facts["parameters"], "base": base, "steps": quality.steps,
            "micro_batch_size": quality.micro_batch_size, "ranks": quality.ranks, "max_length": quality.max_length,
            "experiment": quality.experiment, "rows": rows}
