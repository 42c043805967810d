"""Turn a DeepSpeed JSON file plus the experiment config into the dict deepspeed.initialize takes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from sift_llm import resources
from sift_llm.errors import UserError
from sift_llm.schema import ConfigError

def locate(path: str) -> Path:
    """A DeepSpeed JSON path as given, else a shipped one (so ds_configs/zero2.json works anywhere)."""
    try:
        return resources.locate(path, "deepspeed.config")
    except UserError as err:
        raise ConfigError(str(err)) from None


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _fill(ds: dict, dotted: str, value: Any, source: str) -> None:
    """Set an ``auto`` (or absent) entry; an explicit value must agree with the experiment config."""
    *parents, leaf = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
    elif current != value:
        raise ConfigError(
            f"DeepSpeed config sets {dotted}={current!r} but the experiment config's {source} gives {value!r}; "
            "write \"auto\" in the DeepSpeed JSON or make them agree"
        )


def build_ds_config(cfg, bf16: bool, world_size: int, optimizer_in_config: dict | None = None) -> dict:
    """The resolved DeepSpeed dict for ``cfg`` (an ExperimentConfig)."""
    source = locate(cfg.deepspeed.config)
    try:
        ds = json.loads(source.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{source}:{err.lineno}: invalid JSON ({err.msg})") from None
    _merge(ds, cfg.deepspeed.overrides)
    train = cfg.train
    _fill(ds, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size")
    _fill(ds, "gradient_accumulation_steps", train.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    _fill(ds, "gradient_clipping", train.max_grad_norm, "train.max_grad_norm")
    _fill(ds, "bf16.enabled", bf16, "train.precision")
    global_batch = train.micro_batch_size * train.gradient_accumulation_steps * world_size
    _fill(ds, "train_batch_size", global_batch, "train.micro_batch_size x gradient_accumulation_steps x ranks")
    # A torch.optim optimizer handed to ZeRO is supported; DeepSpeed only asks for this acknowledgement.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if optimizer_in_config:
        ds["optimizer"] = optimizer_in_config
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
