"""Kernels of the sparse increment beyond what torch has: a tile plan of the pattern (pure torch), torch
reference products (any device), and Triton kernels (CUDA; optional: imported only when used).

Triton is not a dependency: CUDA torch ships it, CPU torch does not. :func:`triton_usable` says whether the
Triton kernels can run on a device, and :func:`load_triton_ops` imports them on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType

import torch

from sift_llm.sift.kernels.plan import TilePlan, build_tile_plan, transposed_pattern
from sift_llm.sift.kernels.reference import CsrPattern, increment_matmul, increment_matmul_transposed, increment_patterns

__all__ = [
    "CsrPattern",
    "TilePlan",
    "build_tile_plan",
    "increment_matmul",
    "increment_matmul_transposed",
    "increment_patterns",
    "transposed_pattern",
    "triton_importable",
    "triton_interpret",
    "load_triton_ops",
    "triton_usable",
]


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether the triton package is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    """Whether Triton's CPU interpreter is requested (``TRITON_INTERPRET=1``, Triton's own switch)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load_triton_ops() -> ModuleType:
    """The Triton kernels module (imports triton on first call)."""
    return importlib.import_module("sift_llm.sift.kernels.triton_ops")


def triton_usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on ``device``: CUDA with triton installed, or any device's CPU
    tensors when the kernels were imported under Triton's interpreter."""
    if not triton_importable():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and triton_interpret()
