"""The experiment config: one YAML file describes a run from data to report.

Each stage owns its section's dataclass (``data:`` lives in sift_llm.data, ``method.sift:`` in
sift_llm.sift, ``eval:`` in sift_llm.evaluation); this module composes them, loads YAML with
``section.key=value`` overrides, and writes the resolved config into the run directory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sift_llm import resources, schema
from sift_llm.analysis.config import AnalysisConfig
from sift_llm.data.config import DataConfig
from sift_llm.evaluation.config import EvalConfig
from sift_llm.fsio import atomic_write_text
from sift_llm.schema import ConfigError, option
from sift_llm.sift.config import LLAMA_PROJECTIONS, SiftConfig

RESOLVED_NAME = "config.yaml"


@dataclass
class ModelConfig:
    path: str = option("asset:smollm2-135m-instruct", help="HF model directory, or asset:NAME")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory")
    quantization: Literal["none", "nf4", "fp4"] = option(
        "none",
        help="load the base in 4 bits with bitsandbytes (QLoRA's NF4, or FP4): the targeted Linears, and every other "
        "Linear but lm_head, hold 4-bit weights; embeddings, norms and lm_head stay in the training dtype. SIFT and "
        "LoRA train on top (the trainable values stay fp32); full fine-tuning cannot. none: the full-precision base",
    )
    double_quant: bool = option(
        True, help="with quantization: also quantize the 4-bit blocks' scales (QLoRA's double quantization)"
    )
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", help="with quantization: dtype of the 4-bit products; auto = bf16 on a GPU, fp32 on CPU"
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = option(
        "auto",
        help="with quantization: dtype the packed 4-bit weights are stored in; auto = uint8, or under ZeRO-3 the "
        "training dtype (DeepSpeed partitions and casts floating parameters only; PEFT's ZeRO-3 + 4-bit setting)",
    )


@dataclass
class LoraSection:
    """The ``method.lora`` section (not peft's LoraConfig, which the LoRA method builds from it)."""

    r: int = option(8, min=1, help="LoRA rank")
    alpha: float = option(16.0, min=0, min_exclusive=True, help="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = option(0.0, min=0, max=1, help="dropout on the LoRA input")
    targets: list[str] = option(default_factory=lambda: list(LLAMA_PROJECTIONS), help="module names to adapt")


@dataclass
class MethodConfig:
    name: Literal["sift", "full", "lora"] = option("sift", help="sparse increments, full fine-tuning, or LoRA")
    sift: SiftConfig = field(default_factory=SiftConfig)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class TrainConfig:
    epochs: float = option(1.0, min=0, min_exclusive=True, help="passes over the training split")
    max_steps: int | None = option(None, min=1, help="stop after this many optimizer steps (overrides epochs)")
    micro_batch_size: int = option(4, min=1, help="examples per process per forward")
    gradient_accumulation_steps: int = option(1, min=1, help="micro-batches per optimizer step")
    learning_rate: float = option(2e-4, min=0, min_exclusive=True, help="peak learning rate")
    weight_decay: float = option(0.0, min=0, help="AdamW decoupled weight decay (SIFT: pulls the increment to 0)")
    adam_beta1: float = option(0.9, min=0, max=1)
    adam_beta2: float = option(0.999, min=0, max=1)
    adam_eps: float = option(1e-8, min=0, min_exclusive=True)
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", help="decay after warmup")
    warmup_ratio: float = option(0.03, min=0, max=1, help="share of the steps spent warming up")
    max_grad_norm: float = option(1.0, min=0, help="gradient clipping norm; 0 disables")
    precision: Literal["auto", "bf16", "fp32"] = option("auto", help="auto: bf16 on GPUs, fp32 on CPU")
    log_every: int = option(1, min=1, help="optimizer steps between metric lines")
    eval_every: int = option(0, min=0, help="optimizer steps between held-out losses; 0: at the end only")
    eval_batches: int | None = option(None, min=1, help="cap on held-out micro-batches per evaluation")
    save_every: int = option(0, min=0, help="optimizer steps between checkpoints; 0: at the end only")
    keep_last: int = option(2, min=1, help="checkpoints kept on disk")
    save_merged: bool = option(False, help="also write the merged HF model directory at the end")


@dataclass
class DeepSpeedConfig:
    config: str = option("ds_configs/zero2.json", help="DeepSpeed JSON; batch, clipping, precision are filled in")
    overrides: dict[str, Any] = option(default_factory=dict, help="merged into the DeepSpeed JSON last")


@dataclass
class ExperimentConfig:
    name: str = option("run", help="run name; also the default output directory's name")
    output_dir: str | None = option(None, help="run directory; default runs/<name>")
    seed: int = option(42, help="seed for initialisation, data order and selection")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file; a parse error names the file and line."""
    candidate = Path(path)
    path = candidate if candidate.is_file() or candidate.is_absolute() else resources.shipped(candidate)
    if not path.is_file():
        raise ConfigError(f"{candidate}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read, override and validate an experiment config; errors name the file and the dotted key."""
    raw = read_yaml(path) if path is not None else {}
    schema.apply_overrides(raw, list(overrides))
    try:
        return schema.build(ExperimentConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(schema.to_dict(cfg), sort_keys=False)


def save_resolved(cfg: ExperimentConfig, run_dir: str | Path | None = None) -> Path:
    """Write the fully resolved config (defaults filled in) to ``run_dir/config.yaml``."""
    target = Path(run_dir or cfg.run_dir) / RESOLVED_NAME
    return atomic_write_text(target, dump_config(cfg))
