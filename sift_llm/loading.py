"""Load a model for inference: a base HF directory, base + SIFT adapter, base + LoRA/PEFT adapter, or a merged dir.

One loader for every stage that needs a finished model (training's merged export, evaluation, analysis,
benchmarks): device and dtype resolution, model-directory and adapter checks with clear errors, and the
adapter folded into plain weights in memory. Hugging Face libraries are kept offline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError

ADAPTER_FILES = {
    "sift": "sift_adapter.json",
    "peft": "adapter_config.json",
}
# A 4-bit base (bitsandbytes): how it was quantized, as sift_llm.sift.quantized.quantization_record writes it. A
# SIFT adapter keeps this in sift_adapter.json (base_model.quantization); a LoRA adapter trained on a 4-bit base
# (QLoRA) and the merged directory of a 4-bit run carry it in this file.
QUANTIZATION_FILE = "sift_llm_quantization.json"


def force_offline() -> None:
    """Keep transformers, datasets and huggingface_hub off the network, also when already imported."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


# ---------------------------------------------------------------------------------- device and dtype


def resolve_device(spec: str):
    import torch

    from sift_llm.runtime import default_device

    if spec == "auto":
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"eval.device: {spec!r} is not a device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"eval.device: {spec!r} asked for, but no CUDA device is available here")
    return device


def resolve_dtype(spec: str, device) -> Any:
    import torch

    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, spec)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------- directories


def check_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} directory {path} does not exist")
    if not (path / "config.json").is_file():
        hint = ""
        if any((path / f).is_file() for f in ADAPTER_FILES.values()):
            hint = " (it holds an adapter: pass it as the adapter and the base model as the model)"
        raise UserError(f"{what} directory {path} has no config.json, so it is not an HF model directory{hint}")
    return path


def detect_adapter(adapter_dir: str | os.PathLike) -> str:
    """'sift' or 'lora'/'peft' from the files in ``adapter_dir``."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"adapter directory {path} does not exist")
    if (path / ADAPTER_FILES["sift"]).is_file():
        return "sift"
    config = path / ADAPTER_FILES["peft"]
    if config.is_file():
        try:
            peft_type = json.loads(config.read_text()).get("peft_type", "")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{config}: not a valid PEFT adapter config (JSON object expected)") from None
        return "lora" if str(peft_type).upper() == "LORA" else "peft"
    if (path / "config.json").is_file():
        raise UserError(f"{path} is a full model directory, not an adapter: evaluate it as the model")
    raise UserError(
        f"{path} holds neither a SIFT adapter ({ADAPTER_FILES['sift']}) nor a PEFT adapter ({ADAPTER_FILES['peft']})"
    )


def has_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a SIFT or PEFT adapter's config file."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in ADAPTER_FILES.values())


def _tokenizer_source(model_dir: Path, adapter_dir: Path | None) -> Path:
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return adapter_dir
    return model_dir


# ----------------------------------------------------------------------------------- 4-bit bases


def quantization_kwargs(quant_type: str, double_quant: bool, compute_dtype, quant_storage, device) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments that load a base in 4 bits (bitsandbytes) on ``device``."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype,
                                bnb_4bit_quant_storage=quant_storage)
    return {"quantization_config": config, "device_map": "cpu" if device.type == "cpu" else {"": str(device)}}


def keep_4bit_layout(model) -> None:
    """Stop bitsandbytes from repacking a model's CPU 4-bit weights for its AVX512-BF16 inference kernel.

    bitsandbytes 0.50.2 repacks a ``Linear4bit``'s weight in place on its first eval-mode forward without
    gradients (on a CPU with AVX512-BF16), and every later forward, in training mode too, takes that kernel:
    its output differs (by ~5e-3 on a 128-wide layer) and it has no autograd, so the input gradient through the
    4-bit weight is silently dropped (checked on this machine). A held-out evaluation would thus break the
    training that follows it (QLoRA's base layers), and an evaluated model would differ from the trained one.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def write_quantization_record(directory: str | os.PathLike, record: dict[str, Any], merged: bool = False) -> None:
    """Record next to a LoRA adapter or a merged model that its base was quantized (and how)."""
    from sift_llm.fsio import atomic_write_json

    atomic_write_json(Path(directory) / QUANTIZATION_FILE, {**record, "merged": merged})


def read_quantization_record(directory: str | os.PathLike | None, kind: str | None = None) -> dict[str, Any] | None:
    """How the 4-bit base under an adapter (or merged into a model directory) was quantized; None when it was not."""
    if directory is None:
        return None
    directory = Path(directory)
    if kind == "sift":
        meta = json.loads((directory / ADAPTER_FILES["sift"]).read_text(encoding="utf-8"))
        return (meta.get("base_model") or {}).get("quantization")
    path = directory / QUANTIZATION_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise UserError(f"{path}: not valid JSON (the record of the 4-bit base)") from None


def scored_description(kind: str | None, adapter_quant: dict | None, model_quant: dict | None) -> str:
    """One line for the report: which model the scores are of."""
    if adapter_quant:
        return (f"the 4-bit {adapter_quant['quant_type']} base with the {kind} adapter applied in memory (not merged, "
                "as trained)")
    if model_quant and model_quant.get("merged"):
        return (f"the merged model: the dequantized 4-bit {model_quant['quant_type']} base plus the trained "
                "increments, in full precision")
    if kind:
        return f"the base with the {kind} adapter merged in memory"
    return "the model directory as saved"


# ------------------------------------------------------------------------------------------ loading


def load_model(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info): ``model_dir`` loaded on ``device`` in eval mode, with the adapter applied in memory.

    A SIFT adapter is attached by ``sift_llm.sift.load_adapter`` and merged into the weights; a PEFT adapter
    is loaded with peft and merged into the weights. An adapter trained on a 4-bit base (its record says how it
    was quantized) gets that base, loaded in 4 bits the same way, and stays unmerged: a 4-bit weight cannot hold
    the increment. ``info`` records what was loaded (for results files); ``info["scored"]`` says it in words.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    force_offline()
    model_dir = check_model_dir(model_dir)
    adapter = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    kind = detect_adapter(adapter) if adapter is not None else None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    quant = read_quantization_record(adapter, kind)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quant:
        # Quantize from the weights in the dtype training quantized them from, so the 4-bit base is bit for
        # bit the one the adapter trained on (the adapter's base-content check compares it).
        torch_dtype = getattr(torch, quant["dtype"])
        compute = getattr(torch, quant["compute_dtype"]) if quant.get("compute_dtype") else None
        kwargs = {"dtype": torch_dtype, **quantization_kwargs(quant["quant_type"], quant["double_quant"], compute,
                                                              torch.uint8, dev)}
    elif dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if quant:
        keep_4bit_layout(model)
    elif dev.type == "cpu":
        model.to(dev)
    if kind == "sift":
        from sift_llm.sift import load_adapter, merge_into_base

        handle = load_adapter(model, adapter)
        if not quant:
            # Inference needs no gradient, so the increment is folded into the weights here, in memory:
            # plain Linear layers are faster than sparse-increment ones and nothing is written to disk.
            merge_into_base(handle)
    elif kind in ("lora", "peft"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
        # On a 4-bit base the LoRA layers stay in place (PEFT's merge would requantize the sum, changing it).
        model = model.get_base_model() if quant else model.merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(model_dir, adapter))
    info = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_kind": kind,
        "device": str(dev),
        "dtype": dtype_name(torch_dtype),
    }
    # A 4-bit base under the adapter, or (a merged model's record) under the merged weights.
    model_quant = None if quant else read_quantization_record(model_dir)
    info["quantization"] = quant or model_quant
    info["scored"] = scored_description(kind, quant, model_quant)
    return model, tokenizer, info


def load_for_training(model_dir: str | os.PathLike, *, dtype, gradient_checkpointing: bool,
                      random_init_seed: int | None = None, **from_pretrained: Any):
    """A causal LM to compute gradients with (the trainer's and the analysis's loader), on the CPU or where
    ``from_pretrained`` puts it: no KV cache, optionally activation checkpointing (non-reentrant), and with
    ``random_init_seed`` the same architecture freshly initialised instead of the pretrained weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if random_init_seed is not None:
        torch.manual_seed(random_init_seed)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **from_pretrained)
    model.config.use_cache = False  # also keeps transformers' packed-sequence detection on
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
