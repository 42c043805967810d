"""The training recipe: set up, select, then one plain loop; every rank runs it.

``Trainer(cfg).run()`` reads top to bottom: ``setup_distributed`` -> ``setup_data`` -> ``setup_model`` ->
``setup_method`` -> ``setup_engine`` -> ``select_or_resume`` -> ``train_loop`` -> ``export``. One loop serves
SIFT, full fine-tuning and LoRA; what differs between them lives in :mod:`sift_llm.train.methods`.
Measurement and fault injection attach from outside as callbacks (:mod:`sift_llm.train.callbacks`).

Two rules shape the loop:

- **The loss is token-weighted over the whole optimizer step.** Each micro-batch's loss is its summed
  token loss divided by the learned tokens of the step on all ranks (transformers' ``num_items_in_batch``),
  so a 10-token answer weighs a tenth of a 100-token one, whatever micro-batch or rank it lands on, and the
  logged train loss is the same quantity as the held-out loss.
- **The model trains in training mode.** ``from_pretrained`` returns a model in eval mode and neither
  DeepSpeed nor an evaluation restores it, while transformers recomputes activations (gradient
  checkpointing) and applies dropout only in training mode; so every step sets it.
"""

from __future__ import annotations

import contextlib
import math
import os
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
from sift_llm.runtime import default_device, free_port, is_rank0, log, progress, rank, world_size
from sift_llm.train import checkpoint
from sift_llm.train.batches import BatchPlan, DataPosition, real_tokens
from sift_llm.train.callbacks import CallbackList
from sift_llm.train.ds_config import build_ds_config, offloads_optimizer, zero_stage
from sift_llm.train.methods import build_method
from sift_llm.train.metrics import MetricsLog
from sift_llm.train.schedule import build_scheduler


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN or inf; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_loss: float
    eval_loss: float | None
    output: Path


def init_distributed() -> None:
    """Join (or, for a plain single process, create) the process group DeepSpeed expects."""
    import deepspeed

    # DeepSpeed's ZeRO calls a collective that torch deprecates, once per step: noise in the progress output.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)

    # A process started without a launcher is a world of one; DeepSpeed would otherwise look for MPI.
    defaults = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    if "RANK" not in os.environ:
        defaults["MASTER_PORT"] = str(free_port())
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend)


def build_optimizer(cfg: ExperimentConfig, groups: list[dict], device: torch.device, ds: dict):
    """AdamW from the experiment config: a torch optimizer, or DeepSpeed's own when it offloads to CPU."""
    train = cfg.train
    options = {"lr": train.learning_rate, "betas": (train.adam_beta1, train.adam_beta2), "eps": train.adam_eps}
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **options)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **options)


def learned_tokens(batch: dict) -> int:
    """Label tokens a micro-batch is trained on (labels are shifted by one inside the model, as HF does)."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def _remove_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer (/dev/shm, 66 MiB per rank and master port).

    DeepSpeed's shared-memory all-reduce creates one named segment per rank and never unlinks it, so every
    run leaves them behind in RAM-backed /dev/shm until the machine runs out of memory. Every peer mapped
    it while the process group started, so unlinking the name now frees the memory once all have exited.
    """
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    with contextlib.suppress(OSError):
        os.unlink(os.path.join("/dev/shm", name))


def end_process(code: int) -> None:
    """Leave the process group and exit at once, skipping the interpreter's teardown.

    DeepSpeed keeps the default process group referenced (from objects Python's garbage collector cannot
    reach), so ``destroy_process_group`` leaves its gloo threads running; when the interpreter then tears
    down with a live gloo group, the process aborts ("terminate called without an active exception",
    SIGABRT) in about half of all exits, measured with plain torch.distributed and no DeepSpeed at all. An
    immediate exit after destroying the groups never did. Every output is written and closed by now.
    """
    import sys

    if torch.distributed.is_initialized():
        _remove_shm_buffer()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def resident_parameter_elements(model: torch.nn.Module) -> int:
    """Parameter elements this rank holds: its ZeRO-3 partition of each partitioned parameter, else all."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())


def total_parameter_elements(model: torch.nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())


def quantization_settings(cfg: ExperimentConfig, device: torch.device, bf16: bool, stage: int) -> dict | None:
    """The 4-bit base's settings (``quantization_kwargs`` arguments) from ``model:``, or None for a full-precision
    base; refuses what cannot train: full fine-tuning, and a float storage dtype DeepSpeed would cast."""
    model = cfg.model
    if model.quantization == "none":
        return None
    if cfg.method.name == "full":
        raise UserError(
            f"model.quantization={model.quantization}: full fine-tuning cannot train a 4-bit base (a 4-bit weight "
            "cannot hold an update, and bitsandbytes computes no weight gradient for it); use method.name sift "
            "(sparse increments on the 4-bit weights) or lora (QLoRA), or model.quantization none"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UserError(f"model.quantization={model.quantization} needs the bitsandbytes package ({err})") from None
    train_dtype = torch.bfloat16 if bf16 else torch.float32
    if model.compute_dtype == "auto":
        compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    else:
        compute = getattr(torch, model.compute_dtype)
    if model.quant_storage == "auto":
        storage = train_dtype if stage == 3 else torch.uint8
    else:
        storage = getattr(torch, model.quant_storage)
    name = str(train_dtype).removeprefix("torch.")
    if stage == 3 and storage != train_dtype:
        raise UserError(
            f"model.quant_storage={model.quant_storage} under ZeRO-3: DeepSpeed partitions the packed 4-bit weights "
            f"as parameters of the training dtype ({name}), so the storage must be {name} (or auto)"
        )
    if storage.is_floating_point and storage != train_dtype:
        raise UserError(
            f"model.quant_storage={model.quant_storage}: DeepSpeed casts floating parameters to the training dtype "
            f"({name}), which would corrupt the packed 4-bit codes; use uint8, {name} or auto"
        )
    return {"quant_type": model.quantization, "double_quant": model.double_quant, "compute_dtype": compute,
            "quant_storage": storage}


def _to(batch: dict, device: torch.device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def _all_reduce(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def _gather_per_rank(value):
    gathered = [None] * world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


class Trainer:
    """One training run as ``cfg`` describes it. Construct on every rank, then call :meth:`run`."""

    def __init__(self, cfg: ExperimentConfig, resume: str | bool | None = None, callbacks=()):
        self.cfg = cfg
        self.resume = resume
        self.callbacks = CallbackList(callbacks)
        self.run_dir = cfg.run_dir
        self.summary: dict = {}

    def run(self) -> TrainResult:
        self.setup_distributed()
        self.setup_data()
        self.setup_model()
        self.setup_method()
        self.setup_engine()
        self.callbacks.on_train_start(self)
        self.select_or_resume()
        self.train_loop()
        return self.export()

    # -- setup -------------------------------------------------------------------------------------------

    def setup_distributed(self) -> None:
        """Process group, device, seeds, precision, the DeepSpeed config; refuse what cannot work, early."""
        cfg = self.cfg
        init_distributed()
        self.device = default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(cfg.seed)
        self.ranks, self.rank = world_size(), rank()
        if cfg.train.precision == "auto":
            self.bf16 = self.device.type != "cpu"
        else:
            self.bf16 = cfg.train.precision == "bf16"
        self.ds = build_ds_config(cfg, bf16=self.bf16, world_size=self.ranks)
        self.zero_stage = zero_stage(self.ds)
        if cfg.method.name == "sift" and cfg.method.sift.scope == "global" and self.zero_stage == 3:
            raise UserError(
                "method.sift.scope=global needs every matrix's count before ZeRO-3 partitions the values, and "
                "under ZeRO-3 the selection can only run inside the engine: use scope per_matrix (optionally "
                "with method.sift.budget) or a ZeRO 0-2 config such as ds_configs/zero2.json"
            )
        self.quantization = quantization_settings(cfg, self.device, self.bf16, self.zero_stage)
        self.resume_from = None
        if self.resume:
            self.resume_from = checkpoint.find(self.run_dir, self.resume if isinstance(self.resume, str) else None)
            if self.resume_from is None:
                log(f"resume: no checkpoint under {checkpoint.checkpoint_root(self.run_dir)}, starting fresh")
            else:
                checkpoint.check_compatible(self.resume_from, cfg.method.name, self.ranks)
        if is_rank0():
            save_resolved(cfg, self.run_dir)

    def setup_data(self) -> None:
        """The tokenized dataset and each rank's deterministic order over it.

        Global rank 0 builds (or finds) the dataset first; then the first rank of every other node does
        (a cache hit where nodes share the cache directory, a build of the same bytes where they do not);
        then everyone reads it. All ranks must end on the same fingerprint.
        """
        cfg = self.cfg
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        prepared = None
        if is_rank0():
            prepared = prepare(cfg.data, cfg.model.path)
            if prepared.cached:
                log(f"data: reusing {prepared.path}")
        torch.distributed.barrier()
        if local_rank == 0 and prepared is None:
            prepared = prepare(cfg.data, cfg.model.path)
        torch.distributed.barrier()
        if prepared is None:
            prepared = prepare(cfg.data, cfg.model.path)
        fingerprints = set(_gather_per_rank(prepared.stats["fingerprint"])) if self.ranks > 1 else set()
        if len(fingerprints) > 1:
            raise UserError(
                f"the ranks built different datasets (fingerprints {sorted(f[:12] for f in fingerprints)}): every "
                "node needs the same data file, tokenizer and data options"
            )
        self.prepared = prepared
        splits = load_prepared(prepared.path)
        self.plan = BatchPlan(splits["train"], cfg.train.micro_batch_size, self.rank, self.ranks, cfg.seed)
        validation = splits.get("validation")
        self.eval_plan = None
        if validation is not None and len(validation) >= self.ranks:
            self.eval_plan = BatchPlan(validation, cfg.train.micro_batch_size, self.rank, self.ranks, cfg.seed,
                                       shuffle=False)
        self.accumulation = cfg.train.gradient_accumulation_steps
        steps_per_epoch = max(1, self.plan.micro_batches_per_epoch // self.accumulation)
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    def setup_model(self) -> None:
        """The base model in the training dtype; under ZeRO-3 each rank materialises only its partition.

        transformers' DeepSpeed integration builds the model inside ``deepspeed.zero.Init`` while an
        ``HfDeepSpeedConfig`` of a ZeRO-3 config is alive, and loads the checkpoint one module at a time
        (rank 0 reads, the module's parameters are gathered, filled and partitioned again).
        """
        from transformers import AutoTokenizer

        from sift_llm.loading import load_for_training

        self.model_dir = assets.resolve(self.cfg.model.path)
        tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._zero3_context = None
        if self.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._zero3_context = HfDeepSpeedConfig(self.ds)  # transformers keeps only a weak reference
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        checkpointing = self.cfg.model.gradient_checkpointing
        if self.quantization is not None:
            # A 4-bit base: bitsandbytes quantizes every Linear but lm_head while loading, on this rank's device
            # (transformers never builds a quantized model inside zero.Init; ZeRO-3 partitions it at initialize).
            from sift_llm.loading import keep_4bit_layout, quantization_kwargs

            kwargs = quantization_kwargs(**self.quantization, device=self.device)
            if self.zero_stage == 3:
                kwargs.pop("device_map")  # refused under ZeRO-3; bitsandbytes then loads onto the current device
            model = load_for_training(self.model_dir, dtype=dtype, gradient_checkpointing=checkpointing, **kwargs)
            keep_4bit_layout(model)  # a held-out evaluation must not switch the 4-bit layers to a gradient-less kernel
            self.summary["quantization"] = summary = {
                "quant_type": self.cfg.model.quantization, "double_quant": self.cfg.model.double_quant,
                "compute_dtype": str(self.quantization["compute_dtype"]).removeprefix("torch."),
                "quant_storage": str(self.quantization["quant_storage"]).removeprefix("torch.")}
            log(f"model: 4-bit {summary['quant_type']} base (double quantization "
                f"{'on' if summary['double_quant'] else 'off'}, compute {summary['compute_dtype']})")
        else:
            model = load_for_training(self.model_dir, dtype=dtype, gradient_checkpointing=checkpointing)
        if self.zero_stage != 3 and self.quantization is None:
            model.to(self.device)
        self.model = model
        self.summary["total_parameter_elements"] = total_parameter_elements(model)
        self.summary["resident_parameter_elements"] = self._per_rank(resident_parameter_elements(model))

    def setup_method(self) -> None:
        """Which parameters train; a resumed SIFT run takes its indices from the checkpoint here.

        Global-scope SIFT selects now, on the plain model: its per-matrix counts are known only after the
        selection and must be fixed before DeepSpeed partitions and flattens the values.
        """
        self.method = build_method(self.cfg)
        self.model = self.method.prepare(self.model)
        if self.resume_from is not None:
            self.method.load_state(self.model, self.resume_from)
        elif self.method.selects and self.method.selects_before_engine:
            self.select(self.model)

    def setup_engine(self) -> None:
        """AdamW over the method's parameter groups, the schedule, and the DeepSpeed engine around the model."""
        import deepspeed

        groups = self.method.parameter_groups(self.model, self.cfg.train.weight_decay)
        optimizer = build_optimizer(self.cfg, groups, self.device, self.ds)
        scheduler = build_scheduler(optimizer, self.cfg.train.lr_scheduler, self.cfg.train.warmup_ratio,
                                    self.total_steps)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds
        )
        if self._zero3_context is not None:
            # Loading is done: later loads in this process (the merged export) must not partition.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._zero3_context = None

    def select_or_resume(self) -> None:
        """Continue from the checkpoint, or (per-matrix SIFT) choose the trainable entries inside the engine.

        Inside the engine, ZeRO-3's hooks gather each module's partitioned weights around its forward and
        backward, so the selection sees one whole matrix at a time and never the whole model.
        """
        self.step, self.position = 0, DataPosition()
        if self.resume_from is not None:
            self.step, self.position = checkpoint.load(self.engine, self.method, self.resume_from)
            log(f"resume: continuing from {self.resume_from} at step {self.step}")
        elif self.method.selects and self.method.report is None:
            self.select(self.engine.module)

    def select(self, module: torch.nn.Module) -> None:
        """SIFT's selection on the first optimizer batch (all its micro-batches on every rank), token-weighted.

        selection.json also records each rank's peak memory from the process start to here (loading the model
        and, for per-matrix scope, building the engine), read before the selection's own window opens.
        """
        from sift_llm.train.metrics import peak_memory

        loading = self._per_rank(peak_memory(self.device))
        self.callbacks.on_selection_start(self)
        batches = []
        for index in range(self.method.calibration_batches):
            micro = [self.plan.batch(index * self.accumulation + i, self.pad_id) for i in range(self.accumulation)]
            tokens = self._step_tokens(micro)[0]
            batches.append(([_to(b, self.device) for b in micro], tokens))
        self.method.select(module, batches, micro_batches=self.accumulation)
        report = self.method.report
        report["resident_parameter_elements"] = self._per_rank(resident_parameter_elements(module))
        report["load_peak_memory"] = {key: [entry.get(key) for entry in loading] for key in loading[0]}
        self.callbacks.on_selection_end(self, report)
        if is_rank0():
            atomic_write_json(self.run_dir / "selection.json", report)

    # -- the loop ----------------------------------------------------------------------------------------

    def train_loop(self) -> None:
        cfg, engine = self.cfg, self.engine
        metrics = MetricsLog(self.run_dir, resumed_at=self.step if self.resume_from is not None else None)
        self.last_loss, self.eval_loss = float("nan"), None
        log(
            f"train: {self.method.name}, ZeRO-{self.zero_stage}, {self.ranks} rank(s), "
            f"{'bf16' if self.bf16 else 'fp32'}, {self.total_steps} steps of {cfg.train.micro_batch_size}x"
            f"{self.accumulation}x{self.ranks} examples; {self.method.describe(engine.module)}"
        )
        if self.resume_from is None:
            # The untrained model's held-out loss: the point every later one is measured against.
            self.eval_loss = self.held_out_loss()
            if self.eval_loss is not None:
                metrics.write({"step": 0, "eval_loss": self.eval_loss})
                log(f"step 0: held-out loss {self.eval_loss:.4f} (before training)")
        bar = progress(total=self.total_steps, initial=self.step, desc=f"train {self.method.name}", unit="step")
        self.callbacks.on_loop_start(self)
        try:
            while self.step < self.total_steps:
                step = self.step + 1
                self.callbacks.on_step_start(self, step)
                started = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]  # the rate this step uses; DeepSpeed advances it in step()
                loss, tokens = self.train_step(step)
                self.step = step
                elapsed = time.perf_counter() - started
                self.last_loss = loss
                record = {"step": step, "epoch": round(self.position.micro_batches_done / self.plan.micro_batches_per_epoch, 4),
                          "loss": loss, "lr": lr, "tokens_per_s": tokens / elapsed, "step_time_s": elapsed}
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    record["grad_norm"] = float(norm)
                self.callbacks.on_step_end(self, step, record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / elapsed:.0f}")
                if step % cfg.train.log_every == 0 or step == self.total_steps:
                    metrics.write(record)
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == self.total_steps:
                    self.eval_loss = self.held_out_loss()
                    if self.eval_loss is not None:
                        metrics.write({"step": step, "eval_loss": self.eval_loss})
                        log(f"step {step}: held-out loss {self.eval_loss:.4f}")
                if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == self.total_steps:
                    self.save_checkpoint(step)
                self.callbacks.on_after_checkpoint(self, step)
        finally:
            bar.close()
            metrics.close()

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over ``accumulation`` micro-batches; returns (token-weighted loss, input tokens)."""
        engine = self.engine
        # transformers checkpoints activations and applies dropout only in training mode; an evaluation
        # (or from_pretrained itself) leaves the model in eval mode.
        engine.train()
        micro = [self.plan.batch(self.position.micro_batches_done + i, self.pad_id) for i in range(self.accumulation)]
        # The step's learned tokens on all ranks, known before any forward: every micro-batch's loss is its
        # summed token loss over this count, so the step's gradient is that of the token-weighted mean.
        learned, inputs = self._step_tokens(micro)
        # DeepSpeed averages gradients over ranks and (unless told not to) over accumulation steps; the
        # loss is already normalised by the whole step's tokens, so undo the first and skip the second.
        scale = float(self.ranks)
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        step_loss = float("nan")
        for index, batch in enumerate(micro):
            loss = engine(**_to(batch, self.device), num_items_in_batch=max(learned, 1)).loss
            loss_sum += loss.detach().float()
            engine.backward(loss * scale, scale_wrt_gas=False)
            if index == len(micro) - 1:
                # One collective per step: the logged loss, and a stop signal every rank sees at once,
                # before the update could write a non-finite loss's gradients into the weights.
                step_loss = _all_reduce([float(loss_sum)], self.device)[0]
                if not math.isfinite(step_loss):
                    self._diverged(step, f"the loss became {step_loss}")
                self.callbacks.on_gradients_ready(self, step)
            # DeepSpeed expects step() after every micro-batch; it updates only at the accumulation boundary.
            engine.step()
            self.position.micro_batches_done += 1
        norm = engine.get_global_grad_norm()
        if norm is not None and not math.isfinite(float(norm)):
            self._diverged(step, f"the gradient norm became {float(norm)} (the loss was {step_loss:.4f})")
        return step_loss, inputs

    def _step_tokens(self, micro: list[dict]) -> tuple[int, int]:
        """(learned, input) tokens of these micro-batches summed over every rank."""
        local = [sum(learned_tokens(b) for b in micro), sum(int(real_tokens(b)) for b in micro)]
        learned, inputs = _all_reduce([float(v) for v in local], self.device)
        return int(learned), int(inputs)

    def _diverged(self, step: int, what: str) -> None:
        latest = checkpoint.find(self.run_dir, None)
        kept = f"the last good checkpoint is {latest}" if latest else "no checkpoint was written yet"
        raise TrainingDiverged(
            f"{what} at step {step}; stopping without saving; {kept}. Lower train.learning_rate or check the data."
        )

    def held_out_loss(self) -> float | None:
        """Token-weighted mean loss over the validation split (capped at ``train.eval_batches``), all ranks."""
        plan = self.eval_plan
        if plan is None:
            return None
        limit = self.cfg.train.eval_batches
        total = plan.micro_batches_per_epoch if limit is None else min(limit, plan.micro_batches_per_epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        was_training = self.engine.module.training
        self.engine.eval()
        try:
            with torch.no_grad():
                for index in range(total):
                    batch = plan.batch(index, self.pad_id)
                    count = learned_tokens(batch)
                    # Summed token loss (num_items_in_batch=1), so micro-batches weigh by their tokens.
                    loss_sum += self.engine(**_to(batch, self.device), num_items_in_batch=1).loss.double()
                    tokens += count
        finally:
            self.engine.train(was_training)
        loss_sum, tokens = _all_reduce([float(loss_sum), float(tokens)], self.device)
        return loss_sum / max(tokens, 1.0)

    def save_checkpoint(self, step: int) -> None:
        """Checkpoint ``step``, refusing one whose trainable values are not finite (it would be "last good")."""
        flag = torch.tensor([0.0 if self.method.values_finite(self.engine) else 1.0], device=self.device)
        torch.distributed.all_reduce(flag)
        if float(flag) > 0:
            self._diverged(step, "the trained values are not finite")
        checkpoint.save(self.engine, self.method, self.run_dir, step, self.position, self.cfg.train.keep_last,
                        written=lambda: self.callbacks.on_checkpoint_written(self, step))

    # -- the result --------------------------------------------------------------------------------------

    def export(self) -> TrainResult:
        """The adapter (SIFT, LoRA) or model (full) directory; with ``train.save_merged``, the merged model too."""
        summary = self.summary
        self.callbacks.on_train_end(self, summary)
        output = self.method.export(self.engine, self.run_dir, self.model_dir, save_merged=self.cfg.train.save_merged,
                                    gather=self._gather_context())
        if is_rank0():
            atomic_write_json(self.run_dir / "train_summary.json", {
                "method": self.method.name, "steps": self.step, "final_loss": self.last_loss,
                "eval_loss": self.eval_loss, "dataset": str(self.prepared.path), "output": str(output),
                "base_model": str(self.model_dir), "zero_stage": self.zero_stage, "world_size": self.ranks,
                "bf16": self.bf16, **summary,
            })
            log(f"train: done; {output}")
        return TrainResult(self.run_dir, self.step, self.last_loss, self.eval_loss, output)

    def _gather_context(self):
        """Under ZeRO-3, a context that gathers the given partitioned parameters on every rank (collective)."""
        if self.zero_stage != 3:
            return None
        import deepspeed

        return lambda params: deepspeed.zero.GatheredParameters(params)

    def _per_rank(self, value) -> list:
        return _gather_per_rank(value) if self.ranks > 1 else [value]


def train(cfg: ExperimentConfig, resume: str | bool | None = None, callbacks=()) -> TrainResult:
    """Run (or resume) training as described by ``cfg``; every rank calls this."""
    return Trainer(cfg, resume, callbacks).run()

