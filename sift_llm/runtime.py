"""Process-level facts shared by every stage: which rank we are, which device to use, rank-0 progress."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

T = TypeVar("T")


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank0() -> bool:
    return rank() == 0


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now (for a local rendezvous)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_device() -> torch.device:
    """The accelerator for this process (its LOCAL_RANK-th one) when there is one, else the CPU."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        return torch.device("cuda", local % torch.cuda.device_count())
    if getattr(torch, "xpu", None) is not None and torch.xpu.is_available():
        return torch.device("xpu", local % torch.xpu.device_count())
    return torch.device("cpu")


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar drawn on rank 0 only; other ranks iterate silently."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not is_rank0() or kwargs.pop("disable", False), **kwargs)


def log(message: str) -> None:
    """Print a line on rank 0 only, without breaking an active progress bar."""
    if is_rank0():
        tqdm.write(message)
