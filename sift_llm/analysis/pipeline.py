"""``sift-llm analyze``: the experiment's model and data -> gradient sparsity statistics, plots and a summary."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from sift_llm import assets
from sift_llm.analysis import plots
from sift_llm.analysis.config import AnalysisConfig
from sift_llm.analysis.gradients import gradient_statistics, module_type
from sift_llm.analysis.report import DEFINITION, write_outputs
from sift_llm.analysis.summarize import summarize_model
from sift_llm.config import ExperimentConfig
from sift_llm.data import load_prepared, prepare
from sift_llm.data.encode import IGNORE_INDEX
from sift_llm.errors import UserError
from sift_llm.runtime import default_device, log
from sift_llm.sift.model import find_targets
from sift_llm.train.batches import BatchPlan


def output_dir(cfg: ExperimentConfig, acfg: AnalysisConfig) -> Path:
    return Path(acfg.output) if acfg.output else cfg.run_dir / "analysis"


def _batches(cfg: ExperimentConfig, acfg: AnalysisConfig, pad_id: int) -> tuple[list[dict], Any]:
    prepared = prepare(cfg.data, cfg.model.path)
    splits = load_prepared(prepared.path)
    train = splits["train"]
    plan = BatchPlan(train, cfg.train.micro_batch_size, rank=0, world=1, seed=cfg.seed)
    if acfg.batches > plan.micro_batches_per_epoch:
        log(
            f"analyze: {acfg.batches} batches is more than one epoch ({plan.micro_batches_per_epoch} micro-batches "
            "of the train split); later batches reuse examples in a new order"
        )
    return [plan.batch(i, pad_id) for i in range(acfg.batches)], prepared


def _load(model_dir: Path, *, random_init: bool, seed: int, gradient_checkpointing: bool):
    from sift_llm.loading import load_for_training

    return load_for_training(model_dir, dtype=torch.float32, gradient_checkpointing=gradient_checkpointing,
                             random_init_seed=seed if random_init else None)


def analyze(cfg: ExperimentConfig, acfg: AnalysisConfig) -> Path:
    """Measure, summarise and write the analysis; returns the output directory."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    out = output_dir(cfg, acfg)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a directory")
    device = default_device()
    model_dir = assets.resolve(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches, prepared = _batches(cfg, acfg, pad_id)

    variants = [("pretrained", False)] + ([("random_init", True)] if acfg.random_init else [])
    models: dict[str, Any] = {}
    setup: dict[str, Any] = {}
    for label, random_init in variants:
        model = _load(model_dir, random_init=random_init, seed=cfg.seed,
                      gradient_checkpointing=cfg.model.gradient_checkpointing).to(device)
        targets = find_targets(model, cfg.method.sift)
        if not targets:
            raise UserError(f"method.sift.targets {cfg.method.sift.targets} match no nn.Linear module of {model_dir}")
        if not setup:
            entries = sum(m.weight.numel() for m in targets.values())
            setup = {
                "model": cfg.model.path,
                "model_dir": str(model_dir),
                "model_name": cfg.model.path.removeprefix(assets.ASSET_PREFIX) if cfg.model.path.startswith(
                    assets.ASSET_PREFIX) else Path(cfg.model.path).name,
                "model_parameters": sum(p.numel() for p in model.parameters()),
                "data": cfg.data.path,
                "dataset": str(prepared.dataset_path),
                "batches": len(batches),
                "micro_batch_size": cfg.train.micro_batch_size,
                "max_length": cfg.data.max_length,
                "batch_lengths": [int(b["input_ids"].shape[1]) for b in batches],
                "learned_tokens": int(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)),
                "seed": cfg.seed,
                "targets": list(cfg.method.sift.targets),
                "matrices": len(targets),
                "module_types": list(dict.fromkeys(module_type(name) for name in targets)),
                "entries": entries,
                "device": str(device),
                "dtype": "float32",
                "analysis": asdict(acfg),
                "definition": DEFINITION,
            }
        log(f"analyze: {label}: {len(targets)} matrices, {len(batches)} batches of {cfg.train.micro_batch_size}")
        stats = gradient_statistics(model, targets, batches, acfg, label=label, device=device)
        models[label] = summarize_model(stats, acfg)
        del model, targets, stats
        gc.collect()

    result = {"version": 1, "setup": setup, "models": models, "seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    figures = plots.write_plots(models, out, setup["model_name"])
    result["figures"] = [path.name for path in figures]
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_outputs(result, out, result["figures"])
    return out
