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
    is loaded with peft and merged into the weights. ``info`` records what was loaded (for results files).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    force_offline()
    model_dir = check_model_dir(model_dir)
    adapter = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    kind = detect_adapter(adapter) if adapter is not None else None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if dev.type == "cpu":
        model.to(dev)
    if kind == "sift":
        from sift_llm.sift import load_adapter, merge_into_base

        # Inference needs no gradient, so the increment is folded into the weights here, in memory:
        # plain Linear layers are faster than sparse-increment ones and nothing is written to disk.
        merge_into_base(load_adapter(model, adapter))
    elif kind in ("lora", "peft"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(model_dir, adapter))
    info = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_kind": kind,
        "device": str(dev),
        "dtype": dtype_name(torch_dtype),
    }
    return model, tokenizer, info
