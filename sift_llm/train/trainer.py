"""The training recipe: data, model, method, DeepSpeed engine, loop, checkpoints, exports.

One loop serves SIFT, full fine-tuning and LoRA; what differs between them lives in sift_llm.train.methods.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from sift_llm import assets
from sift_llm.config import ExperimentConfig, save_resolved
from sift_llm.data import load_prepared, prepare
from sift_llm.data.encode import IGNORE_INDEX
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_write_json
from sift_llm.runtime import default_device, is_rank0, log, progress, rank, world_size
from sift_llm.train import checkpoint, faults
from sift_llm.train.batches import BatchPlan, DataPosition
from sift_llm.train.ds_config import build_ds_config, offloads_optimizer, zero_stage
from sift_llm.train.methods import build_method
from sift_llm.train.metrics import COLLECTIVES, MetricsLog, peak_memory, reset_peak_memory
from sift_llm.train.schedule import build_scheduler


class TrainingDiverged(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    output: Path


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def init_distributed() -> None:
    """Join (or, for a plain single process, create) the process group DeepSpeed expects."""
    import deepspeed

    # DeepSpeed's ZeRO calls a collective that torch deprecates, once per step: noise in the progress output.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

    # A process started without a launcher is a world of one; DeepSpeed would otherwise look for MPI.
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "RANK" not in os.environ:
        defaults["MASTER_PORT"] = _free_port()
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)


def _barrier() -> None:
    torch.distributed.barrier()


def _use_bf16(cfg: ExperimentConfig, device: torch.device) -> bool:
    if cfg.train.precision == "auto":
        return device.type != "cpu"
    return cfg.train.precision == "bf16"


def _prepare_data(cfg: ExperimentConfig):
    """Rank 0 builds (or finds) the dataset; the others wait, then reuse it from the cache."""
    if is_rank0():
        prepared = prepare(cfg.data, cfg.model.path)
        if prepared.cached:
            log(f"data: reusing {prepared.path}")
    _barrier()
    if not is_rank0():
        prepared = prepare(cfg.data, cfg.model.path)
    return prepared, load_prepared(prepared.path)


def _load_model(model_dir: Path, bf16: bool, gradient_checkpointing: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if bf16 else torch.float32)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return model, pad_id


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _learned_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum()


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    with COLLECTIVES.paused():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _per_rank(record: dict) -> dict:
    """{key: [value on rank 0, rank 1, ...]} for a dict every rank passes."""
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, record)
    return {key: [entry.get(key) for entry in gathered] for key in record}


def _optimizer(cfg: ExperimentConfig, groups: list[dict], device: torch.device, ds: dict):
    """AdamW from the experiment config: a torch optimizer, or DeepSpeed's own when it offloads to CPU."""
    train = cfg.train
    options = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **options)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **options)


def held_out_loss(engine, plan: BatchPlan | None, pad_id: int, device: torch.device, max_batches: int | None):
    """Token-weighted mean loss over the validation split, summed across ranks."""
    if plan is None:
        return None
    engine.eval()
    total = plan.micro_batches_per_epoch if max_batches is None else min(max_batches, plan.micro_batches_per_epoch)
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for index in range(total):
            batch = _to(plan.batch(index, pad_id), device)
            count = _learned_tokens(batch)
            loss_sum += float(engine(**batch).loss.float()) * float(count)
            tokens += float(count)
    engine.train()
    loss_sum, tokens = _all_reduce([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1.0)


def train(cfg: ExperimentConfig, resume: str | bool | None = None) -> TrainResult:
    """Run (or resume) training as described by ``cfg``; every rank calls this."""
    import deepspeed

    COLLECTIVES.install()  # bench measurement hook; a no-op unless SIFT_LLM_COUNT_COLLECTIVES=1
    init_distributed()
    device = default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    run_dir = cfg.run_dir
    if is_rank0():
        save_resolved(cfg, run_dir)
    prepared, splits = _prepare_data(cfg)
    bf16 = _use_bf16(cfg, device)
    model_dir = assets.resolve(cfg.model.path)
    model, pad_id = _load_model(model_dir, bf16, cfg.model.gradient_checkpointing)
    model.to(device)

    ranks, me = world_size(), rank()
    plan = BatchPlan(splits["train"], cfg.train.micro_batch_size, me, ranks, cfg.seed)
    validation = splits.get("validation")
    eval_plan = None
    if validation is not None and len(validation) >= ranks:
        eval_plan = BatchPlan(validation, cfg.train.micro_batch_size, me, ranks, cfg.seed, shuffle=False)
    accumulation = cfg.train.gradient_accumulation_steps
    steps_per_epoch = max(1, plan.micro_batches_per_epoch // accumulation)
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    method = build_method(cfg)
    model = method.prepare(model)
    resume_from = checkpoint.find(run_dir, resume if isinstance(resume, str) else None) if resume else None
    if resume and resume_from is None:
        log(f"resume: no checkpoint under {checkpoint.checkpoint_root(run_dir)}, starting fresh")
    if resume_from is not None:
        method.load_state(model, resume_from)
    elif method.calibration_batches:
        # Selection runs on the plain model, before DeepSpeed wraps it: ZeRO's gradient hooks must not see
        # calibration backward passes, and global-scope counts must be fixed before values are partitioned.
        reset_peak_memory(device)
        selection_started = time.perf_counter()
        method.select(model, [_to(plan.batch(i, pad_id), device) for i in range(method.calibration_batches)])
        method.report["wall_seconds"] = time.perf_counter() - selection_started
        method.report["peak_memory"] = _per_rank(peak_memory(device))
        if is_rank0():
            atomic_write_json(run_dir / "selection.json", method.report)

    ds = build_ds_config(cfg, bf16=bf16, world_size=ranks)
    optimizer = _optimizer(cfg, method.parameter_groups(model, cfg.train.weight_decay), device, ds)
    scheduler = build_scheduler(optimizer, cfg.train.lr_scheduler, cfg.train.warmup_ratio, total_steps)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds
    )

    step, position = 0, DataPosition()
    if resume_from is not None:
        step, position = checkpoint.load(engine, method, resume_from)
        log(f"resume: continuing from {resume_from} at step {step}")

    log(
        f"train: {method.name}, ZeRO-{zero_stage(ds)}, {ranks} rank(s), {'bf16' if bf16 else 'fp32'}, "
        f"{total_steps} steps of {cfg.train.micro_batch_size}x{accumulation}x{ranks} examples; {method.describe(engine.module)}"
    )
    metrics = MetricsLog(run_dir, resumed_at=step if resume_from is not None else None)
    last_loss, eval_loss = float("nan"), None
    if resume_from is None:
        # The untrained model's held-out loss: the point every later one is measured against.
        eval_loss = held_out_loss(engine, eval_plan, pad_id, device, cfg.train.eval_batches)
        if eval_loss is not None:
            metrics.write({"step": 0, "eval_loss": eval_loss})
            log(f"step 0: held-out loss {eval_loss:.4f} (before training)")
    bar = progress(total=total_steps, initial=step, desc=f"train {method.name}", unit="step")
    reset_peak_memory(device)
    loop_peak = peak_memory(device)
    try:
        while step < total_steps:
            started, cpu_started = time.perf_counter(), time.process_time()
            COLLECTIVES.start_step()
            lr = scheduler.get_last_lr()[0]  # the rate this step uses; DeepSpeed advances it in engine.step
            loss_sum = tokens = 0.0
            for _ in range(accumulation):
                batch = _to(plan.batch(position.micro_batches_done, pad_id), device)
                loss = engine(**batch).loss
                # One collective per micro-batch both averages the loss for logging and tells every rank
                # at once when any rank saw a non-finite loss, so all stop together.
                rank_loss, rank_tokens = _all_reduce([float(loss.detach().float()), float(batch["attention_mask"].sum())], device)
                if not math.isfinite(rank_loss):
                    latest = checkpoint.find(run_dir, None)
                    kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"the loss became {rank_loss} at step {step + 1} (micro-batch {position.micro_batches_done}); "
                        f"stopping; {kept}. Lower train.learning_rate or check the data."
                    )
                engine.backward(loss)
                engine.step()
                position.micro_batches_done += 1
                loss_sum += rank_loss / ranks
                tokens += rank_tokens
            step += 1
            elapsed = time.perf_counter() - started
            cpu_seconds = time.process_time() - cpu_started  # this process's CPU time: robust to a busy machine
            collective_bytes = COLLECTIVES.end_step()
            loop_peak = peak_memory(device)  # the steps' peak, before this step's evaluation or checkpoint
            last_loss = loss_sum / accumulation
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
            if step % cfg.train.log_every == 0 or step == total_steps:
                record = {"step": step, "epoch": round(position.micro_batches_done / plan.micro_batches_per_epoch, 4),
                          "loss": last_loss, "lr": lr, "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                          "step_cpu_s": cpu_seconds}
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    record["grad_norm"] = float(norm)
                if collective_bytes is not None:
                    record["collective_bytes"] = collective_bytes
                metrics.write(record)
            if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps:
                eval_loss = held_out_loss(engine, eval_plan, pad_id, device, cfg.train.eval_batches)
                if eval_loss is not None:
                    metrics.write({"step": step, "eval_loss": eval_loss})
                    log(f"step {step}: held-out loss {eval_loss:.4f}")
            if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total_steps:
                checkpoint.save(engine, method, run_dir, step, position, cfg.train.keep_last)
            faults.maybe_die("after_step", step)
    finally:
        bar.close()
        metrics.close()
    # Peak memory of the training steps (weights, optimizer state, activations), each rank's own.
    training_peak = _per_rank(loop_peak)

    output = method.export(engine, run_dir, model_dir, save_merged=cfg.train.save_merged)
    if is_rank0():
        atomic_write_json(run_dir / "train_summary.json", {
            "method": method.name, "steps": step, "final_loss": last_loss, "eval_loss": eval_loss,
            "dataset": str(prepared.path), "output": str(output), "base_model": str(model_dir),
            "zero_stage": zero_stage(ds), "world_size": ranks, "bf16": bf16, "peak_memory": training_peak,
        })
        log(f"train: done; {output}")
    return TrainResult(run_dir, step, last_loss, eval_loss, output)
