"""What differs between SIFT, full fine-tuning and LoRA inside the one training loop.

Each method prepares the model (which parameters train), optionally selects (SIFT), groups parameters
for AdamW, keeps its own extra checkpoint state, and exports its result: an adapter or a model directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sift_llm.config import ExperimentConfig
from sift_llm.fsio import atomic_dir
from sift_llm.runtime import is_rank0

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float, decay_1d: set[str]) -> list[dict]:
    """AdamW groups: matrices (and the named 1-D tensors) decay; biases and norm scales do not."""
    decay = [p for n, p in named if p.ndim >= 2 or n in decay_1d]
    plain = [p for n, p in named if not (p.ndim >= 2 or n in decay_1d)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


def _full_fp32(params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's fp32 master (every rank must call this under ZeRO-3; the result is on CPU)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return [safe_get_full_fp32_param(p).detach().float().cpu() for p in params]


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def _write_merged(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Base + adapter merged into a standard HF directory that plain transformers loads (rank 0, CPU, fp32)."""
    from sift_llm.evaluation.harness import load_model

    model, tokenizer, _ = load_model(model_dir, adapter_dir, device="cpu", dtype="float32")
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


class SiftMethod:
    name = "sift"

    def __init__(self, cfg: ExperimentConfig):
        self.config = cfg.method.sift
        self.calibration_batches = self.config.calibration_batches
        self.handle = None
        self.report: dict | None = None

    def prepare(self, model):
        from sift_llm.sift import attach_sift

        self.handle = attach_sift(model, self.config)
        return model

    def select(self, model, batches: list[dict]) -> None:
        selector = self.handle.selector()
        with selector.calibrating():
            for batch in batches:
                model(**batch).loss.backward()
        self.report = selector.finalize().to_dict()

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        named = self.handle.named_trainable_parameters()
        values = {name for name, _ in named if name.endswith(".values")}
        return _decay_groups(named, weight_decay, decay_1d=values)

    def describe(self, model) -> str:
        selected = sum(layer.k for layer in self.handle.layers.values())
        total = sum(layer.numel_weight for layer in self.handle.layers.values())
        return f"{selected:,} of {total:,} entries in {len(self.handle.layers)} matrices trainable ({selected / total:.2%})"

    def save_state(self, model, directory: Path) -> None:
        save_file({name: layer.indices.contiguous() for name, layer in self.handle.layers.items()},
                  str(directory / "sift_indices.safetensors"))

    def load_state(self, model, directory: Path) -> None:
        indices = load_file(str(directory / "sift_indices.safetensors"))
        for name, layer in self.handle.layers.items():
            layer.set_selection(indices[name])

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool) -> Path:
        from sift_llm.sift import save_adapter

        names = list(self.handle.layers)
        values = _full_fp32([self.handle.layers[n].values for n in names])
        dense_names = list(self.handle.dense_parameters())
        dense = _full_fp32(list(self.handle.dense_parameters().values()))
        out = run_dir / ADAPTER_DIR
        if is_rank0():
            increments = {n: (self.handle.layers[n].indices.cpu(), v) for n, v in zip(names, values)}
            extra = {"selection": self.report} if self.report else {}
            save_adapter(self.handle, out, increments=increments, dense_state=dict(zip(dense_names, dense)),
                         extra=extra, replace=True)
            if save_merged:
                _write_merged(model_dir, out, run_dir / MERGED_DIR)
        return out


class FullMethod:
    name = "full"
    calibration_batches = 0
    report = None

    def prepare(self, model):
        model.requires_grad_(True)
        return model


    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        return _decay_groups(list(model.named_parameters()), weight_decay, decay_1d=set())

    def describe(self, model) -> str:
        return f"{sum(p.numel() for p in model.parameters()):,} parameters trainable (all)"

    def save_state(self, model, directory: Path) -> None:
        return None

    def load_state(self, model, directory: Path) -> None:
        return None

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool) -> Path:
        """The trained model as an HF directory (ZeRO-3 shards are gathered to rank 0 first)."""
        if engine.zero_optimization_stage() == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = engine.module.state_dict()
        out = run_dir / MERGED_DIR
        if is_rank0():
            with atomic_dir(out, replace=True) as tmp:
                engine.module.save_pretrained(tmp, state_dict=state)
                _copy_tokenizer(model_dir, tmp)
        return out


class LoraMethod:
    name = "lora"
    calibration_batches = 0
    report = None

    def __init__(self, cfg: ExperimentConfig):
        self.config = cfg.method.lora

    def prepare(self, model):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                          target_modules=self.config.targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)


    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return _decay_groups(named, weight_decay, decay_1d=set())

    def describe(self, model) -> str:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return f"{trainable:,} LoRA parameters trainable (r={self.config.r}, alpha={self.config.alpha})"

    def save_state(self, model, directory: Path) -> None:
        return None

    def load_state(self, model, directory: Path) -> None:
        return None

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool) -> Path:
        from peft import get_peft_model_state_dict

        model = engine.module
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        masters = dict(zip((n for n, _ in named), _full_fp32([p for _, p in named])))
        out = run_dir / ADAPTER_DIR
        if is_rank0():
            state = get_peft_model_state_dict(model, state_dict=masters)
            with atomic_dir(out, replace=True) as tmp:
                model.save_pretrained(tmp, state_dict=state)
            if save_merged:
                _write_merged(model_dir, out, run_dir / MERGED_DIR)
        return out


def build_method(cfg: ExperimentConfig):
    name = cfg.method.name
    if name == "sift":
        return SiftMethod(cfg)
    if name == "lora":
        return LoraMethod(cfg)
    return FullMethod()
