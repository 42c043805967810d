"""The ``sift`` config section: which matrices are sparse, how many entries train, how they are chosen."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from sift_llm.schema import ConfigError, option

LLAMA_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Metrics that score a matrix from one batch only; summing them over batches would change their meaning.
SINGLE_BATCH_METRICS = ("grad_abs", "weight_abs", "random")


@dataclass
class SiftConfig:
    """Sparse Increment Fine-Tuning: train only the top entries of each targeted weight matrix."""

    targets: list[str] = option(
        default_factory=lambda: list(LLAMA_PROJECTIONS),
        help="nn.Linear modules made sparse: a name suffix ('q_proj' matches 'model.layers.0.self_attn.q_proj') "
        "or a regular expression matched against the full module name",
    )
    density: float = option(
        0.01,
        help="fraction of each targeted matrix that trains (SIFT: top x% per matrix); ignored when budget is set",
        min=0.0,
        max=1.0,
        min_exclusive=True,
    )
    budget: int | None = option(
        None,
        help="absolute number of trainable entries over all targeted matrices; wins over density when set. "
        "per_matrix scope splits it in proportion to matrix size, global scope gives it to the global top-k",
        min=1,
    )
    metric: Literal["grad_abs", "grad_abs_sum", "weight_abs", "snip", "fisher", "random"] = option(
        "grad_abs",
        help="salience score: grad_abs = |g| of the first batch (SIFT); grad_abs_sum = |g| summed over "
        "calibration_batches; weight_abs = |w|; snip = |w*g| summed; fisher = g^2 summed; random = seeded uniform",
    )
    scope: Literal["per_matrix", "global"] = option(
        "per_matrix",
        help="per_matrix: top-k inside every matrix (SIFT); global: one top-k over all targeted entries (SPEFT). "
        "global sizes are known only after selection, so select before building the optimizer or DeepSpeed engine",
    )
    calibration_batches: int = option(
        1,
        help="batches scored before the selection is fixed; a batch is one optimizer batch (micro_batch_size x "
        "gradient_accumulation_steps x ranks examples, the token-weighted gradient of a training step)",
        min=1,
    )
    pool_factor: float = option(
        4.0,
        help="accumulated metrics over several batches: the first batch nominates pool_factor x k candidates whose "
        "scores are then summed exactly over the later batches (exact when the pool covers the matrix)",
        min=1.0,
    )
    dense_modules: list[str] = option(
        default_factory=list,
        help="modules trained fully (every parameter trainable, e.g. lm_head); same matching rules as targets",
    )
    values_dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32",
        help="dtype of the trainable values in plain PyTorch (DeepSpeed bf16/fp16 casts them and keeps an fp32 master)",
    )
    seed: int = option(0, help="seed of the random metric; identical on every rank")
    values_grad: Literal["auto", "dense", "sampled", "triton"] = option(
        "auto",
        help="kernel for the values' gradient (grad_out^T x at the indices): auto = the per-device cost rule; "
        "dense = dense row blocks gathered at the indices; sampled = torch.sparse.sampled_addmm (SDDMM); "
        "triton = the Triton tile kernel (CUDA with triton installed). Every path gives the same gradient",
    )
    merge: Literal["patch", "clone", "increment"] = option(
        "patch",
        help="how W + scatter(values) enters each product: patch = W patched in place at the indices and "
        "restored (bitwise the same as clone, no copy); clone = a transient dense copy; increment = "
        "x @ W^T plus a separate sparse product x @ S^T (W untouched, as a quantized base needs)",
    )

    def __post_init__(self) -> None:
        if not self.targets:
            raise ConfigError("targets: at least one module name or pattern is required")
        for key in ("targets", "dense_modules"):
            for pattern in getattr(self, key):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(f"{key}: {pattern!r} is not a valid regular expression ({err})") from None
        if self.metric in SINGLE_BATCH_METRICS and self.calibration_batches > 1:
            raise ConfigError(
                f"metric {self.metric!r} scores a single batch; set calibration_batches: 1 "
                "or use an accumulated metric (grad_abs_sum, snip, fisher)"
            )

    @property
    def accumulates(self) -> bool:
        """Whether scores are summed over more than one batch (and so need a candidate pool)."""
        return self.calibration_batches > 1


def density_count(density: float, numel: int) -> int:
    """Entries a density keeps in a matrix of ``numel`` entries: rounded, at least one, at most all."""
    return min(numel, max(1, round(density * numel)))


def matches(name: str, patterns: list[str]) -> bool:
    """True when a module name equals or ends with a pattern (as a dotted suffix) or fully matches it as a regex."""
    return any(name == p or name.endswith("." + p) or re.fullmatch(p, name) for p in patterns)
