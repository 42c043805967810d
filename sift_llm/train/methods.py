"""What differs between SIFT, full fine-tuning and LoRA inside the one training loop.

Each method prepares the model (which parameters train), optionally selects (SIFT), groups parameters
for AdamW, keeps its own extra checkpoint state, and exports its result: an adapter or a model directory.
:class:`Method` holds the behaviour they share (no selection, no extra state); a method overrides the rest.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sift_llm.config import ExperimentConfig
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir
from sift_llm.runtime import is_rank0

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")

# Under ZeRO-3: given parameters, a context in which they are gathered whole on every rank (a collective).
Gather = Callable[[list[torch.nn.Parameter]], contextlib.AbstractContextManager] | None


def _decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float, decay_1d: set[str]) -> list[dict]:
    """AdamW groups: matrices (and the named 1-D tensors) decay; biases and norm scales do not."""
    decay = [p for n, p in named if p.ndim >= 2 or n in decay_1d]
    plain = [p for n, p in named if not (p.ndim >= 2 or n in decay_1d)]
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


def full_fp32(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each trained tensor's fp32 value on CPU: DeepSpeed's fp32 master where it keeps one (ZeRO 1-3, bf16),
    the parameter itself where it does not (ZeRO-0 in fp32, or an empty values buffer). Every rank calls it."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for param in params:
        master = safe_get_full_fp32_param(param) if isinstance(param, torch.nn.Parameter) else None
        out.append((param if master is None else master).detach().float().cpu())
    return out


def local_elements(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's elements of ``tensor``: all of it, or under ZeRO-3 its partition without the padding.

    ZeRO-3 pads a parameter to a multiple of the ranks and allocates each partition with ``torch.empty``;
    the last ranks' tails are never written, so they hold whatever memory was there, NaN bit patterns
    included (in bf16 about one pattern in 256 is NaN or inf). Only the first ``ds_numel - start``
    elements of a partition belong to the parameter.
    """
    partition = getattr(tensor, "ds_tensor", None)
    if partition is None:
        return tensor
    start = partition.ds_numel * tensor.ds_zero_partition_rank
    return partition.narrow(0, 0, max(0, min(partition.ds_numel, tensor.ds_numel - start)))


def _all_finite(tensors) -> bool:
    """Whether every element of this rank's share of ``tensors`` is finite (ZeRO-3: its partitions)."""
    return all(bool(torch.isfinite(t).all()) for t in map(local_elements, tensors) if t.numel())


def _copy_tokenizer(model_dir: Path, out: Path) -> None:
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)


def _write_merged(model_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Base + adapter merged into a standard HF directory that plain transformers loads (rank 0, CPU, fp32).

    On a 4-bit base: the dequantized base plus the trained increment (or LoRA product), in fp32, with a record
    of the quantization the run trained on (``sift_llm.loading.QUANTIZATION_FILE``, ``merged: true``).
    """
    from sift_llm.loading import detect_adapter, load_model, read_quantization_record, write_quantization_record

    quant = read_quantization_record(adapter_dir, detect_adapter(adapter_dir))
    if quant:
        model, tokenizer = _dequantized_merge(model_dir, adapter_dir, quant)
    else:
        model, tokenizer, _ = load_model(model_dir, adapter_dir, device="cpu", dtype="float32")
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if quant:
            write_quantization_record(tmp, quant, merged=True)
    return out


def _dequantized_merge(model_dir: Path, adapter_dir: Path, quant: dict):
    """(model, tokenizer): the 4-bit base, dequantized to fp32, with the adapter folded in (CPU).

    SIFT: the adapter goes onto the 4-bit base as trained, then each layer's dequantized weight takes its
    increment. LoRA: the base is dequantized first and the LoRA product merged into it (PEFT's merge into a
    4-bit weight would requantize the sum).
    """
    from sift_llm.loading import detect_adapter, load_model, quantization_kwargs

    if detect_adapter(adapter_dir) == "sift":
        from sift_llm.sift.quantized import merge_and_dequantize

        model, tokenizer, _ = load_model(model_dir, adapter_dir, device="cpu", dtype="float32")
        return merge_and_dequantize(model, torch.float32), tokenizer
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    compute = getattr(torch, quant["compute_dtype"]) if quant.get("compute_dtype") else None
    base = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, quant["dtype"]),
        **quantization_kwargs(quant["quant_type"], quant["double_quant"], compute, torch.uint8, torch.device("cpu")))
    base = base.dequantize(dtype=torch.float32).to(torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    return model, AutoTokenizer.from_pretrained(model_dir)


def _quantization(model) -> dict | None:
    """How the model's 4-bit Linears were quantized (None for a full-precision model)."""
    from sift_llm.sift.layer import is_4bit
    from sift_llm.sift.model import base_quantization

    return base_quantization(m for m in model.modules() if is_4bit(m))


class Method:
    """The shared behaviour: nothing to select, no state beyond DeepSpeed's, every trainable parameter
    trained. Subclasses set ``name`` and implement ``prepare``, ``describe`` and ``export``."""

    name = ""
    selects = False  # whether the method chooses its trainable entries from gradients (SIFT)
    selects_before_engine = False  # ... on the plain model, before DeepSpeed exists (sizes not yet fixed)
    calibration_batches = 0
    report: dict | None = None

    def prepare(self, model):
        raise NotImplementedError

    def select(self, module, batches: list[tuple[list[dict], int]], micro_batches: int) -> None:
        raise NotImplementedError(f"{self.name} does not select")

    def trainable(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        return _decay_groups(self.trainable(model), weight_decay, decay_1d=set())

    def values_finite(self, engine) -> bool:
        """Whether this rank's trainable tensors are finite (checked before every checkpoint)."""
        return _all_finite(p for _, p in self.trainable(engine.module))

    def describe(self, model) -> str:
        raise NotImplementedError

    def save_state(self, model, directory: Path) -> None:
        """Method state DeepSpeed's checkpoint does not hold (rank 0 writes it into ``directory``)."""

    def load_state(self, model, directory: Path) -> None:
        """Restore :meth:`save_state`'s state, before the DeepSpeed engine is built."""

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool, gather: Gather = None) -> Path:
        raise NotImplementedError


class SiftMethod(Method):
    name = "sift"
    selects = True

    def __init__(self, cfg: ExperimentConfig):
        self.config = cfg.method.sift
        self.calibration_batches = self.config.calibration_batches
        self.selects_before_engine = self.config.scope == "global"
        self.handle = None
        self.report = None

    def prepare(self, model):
        from sift_llm.sift import attach_sift

        self.handle = attach_sift(model, self.config)
        return model

    def select(self, module, batches: list[tuple[list[dict], int]], micro_batches: int) -> None:
        """Score every (micro-batches, learned tokens) batch with the token-weighted loss, then fix the selection."""
        selector = self.handle.selector(micro_batches=micro_batches)
        with selector.calibrating():
            for micro, tokens in batches:
                for batch in micro:
                    module(**batch, num_items_in_batch=max(tokens, 1)).loss.backward()
        self.report = selector.finalize().to_dict()

    def trainable(self, model) -> list[tuple[str, torch.nn.Parameter]]:
        return self.handle.named_trainable_parameters()

    def parameter_groups(self, model, weight_decay: float) -> list[dict]:
        named = self.trainable(model)
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

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool, gather: Gather = None) -> Path:
        from sift_llm.sift import save_adapter

        layers = self.handle.layers
        names = list(layers)
        values = full_fp32([layers[n].values for n in names])
        dense = self.handle.dense_parameters()
        dense_values = full_fp32(list(dense.values()))
        content = self.handle.base_content(gather=gather)  # every rank: ZeRO-3 gathers one matrix at a time
        out = run_dir / ADAPTER_DIR
        if is_rank0():
            increments = {n: (layers[n].indices.cpu(), v) for n, v in zip(names, values)}
            extra = {"selection": self.report} if self.report else {}
            save_adapter(self.handle, out, increments=increments, dense_state=dict(zip(dense, dense_values)),
                         extra=extra, replace=True, content=content)
            if save_merged:
                _write_merged(model_dir, out, run_dir / MERGED_DIR)
        return out


class FullMethod(Method):
    name = "full"

    def prepare(self, model):
        if _quantization(model) is not None:
            raise UserError("full fine-tuning cannot train a 4-bit base (model.quantization): use method sift or lora")
        model.requires_grad_(True)
        return model

    def describe(self, model) -> str:
        total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
        return f"{total:,} parameters trainable (all)"

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool, gather: Gather = None) -> Path:
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


class LoraMethod(Method):
    name = "lora"

    def __init__(self, cfg: ExperimentConfig):
        self.config = cfg.method.lora

    def prepare(self, model):
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=self.config.r, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
                          target_modules=self.config.targets, task_type="CAUSAL_LM")
        return get_peft_model(model, lora)

    def describe(self, model) -> str:
        trainable = sum(p.numel() for _, p in self.trainable(model))
        return f"{trainable:,} LoRA parameters trainable (r={self.config.r}, alpha={self.config.alpha})"

    def export(self, engine, run_dir: Path, model_dir: Path, save_merged: bool, gather: Gather = None) -> Path:
        from peft import get_peft_model_state_dict

        model = engine.module
        named = self.trainable(model)
        masters = dict(zip((n for n, _ in named), full_fp32([p for _, p in named])))
        out = run_dir / ADAPTER_DIR
        if is_rank0():
            state = get_peft_model_state_dict(model, state_dict=masters)
            quant = _quantization(model)
            with atomic_dir(out, replace=True) as tmp:
                model.save_pretrained(tmp, state_dict=state)
                if quant:  # QLoRA: the adapter applies to the 4-bit base it trained on
                    from sift_llm.loading import write_quantization_record

                    write_quantization_record(tmp, quant)
            if save_merged:
                _write_merged(model_dir, out, run_dir / MERGED_DIR)
        return out


def build_method(cfg: ExperimentConfig) -> Method:
    name = cfg.method.name
    if name == "sift":
        return SiftMethod(cfg)
    if name == "lora":
        return LoraMethod(cfg)
    return FullMethod()
