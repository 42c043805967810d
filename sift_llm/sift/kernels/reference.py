"""Device-agnostic torch versions of the sparse-increment products, for CPU and for GPUs without Triton.

``S`` is the ``out x in`` sparse increment (``values`` at sorted flat row-major ``indices``). The products are
computed as CSR sparse-dense products (``torch.sparse.mm``) in fp32 (fp64 for fp64 inputs; CPU CSR kernels
lack bf16/fp16), and returned in the input's dtype.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sift_llm.sift.kernels.plan import transposed_pattern


@dataclass(frozen=True)
class CsrPattern:
    """A CSR pattern of sorted flat indices (``rows x cols``), plus the permutation that produced them from
    the layer's own indices (``None`` when they are the layer's indices)."""

    rows: int
    cols: int
    crow: torch.Tensor
    col: torch.Tensor
    perm: torch.Tensor | None = None


def csr_pattern(indices: torch.Tensor, rows: int, cols: int, perm: torch.Tensor | None = None) -> CsrPattern:
    flat = indices.reshape(-1).to(torch.int64)
    edges = torch.arange(rows + 1, device=flat.device, dtype=torch.int64) * cols
    return CsrPattern(rows, cols, torch.searchsorted(flat, edges), flat % cols, perm)


def increment_patterns(indices: torch.Tensor, out_features: int, in_features: int) -> tuple[CsrPattern, CsrPattern]:
    """The CSR patterns of S (for ``x @ S^T``) and of S^T (for ``g @ S``)."""
    transposed, perm = transposed_pattern(indices, out_features, in_features)
    return (csr_pattern(indices, out_features, in_features),
            csr_pattern(transposed, in_features, out_features, perm))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def csr_matmul_t(inputs: torch.Tensor, pattern: CsrPattern, values: torch.Tensor) -> torch.Tensor:
    """``inputs @ M^T`` for the sparse ``M`` (``pattern.rows x pattern.cols``) holding ``values`` in pattern
    order (permuted by ``pattern.perm`` first when set): ``inputs`` is (tokens, cols), the result (tokens, rows)."""
    compute = _compute_dtype(inputs.dtype)
    vals = values.detach() if pattern.perm is None else values.detach()[pattern.perm]
    # autocast would run the product in bf16, which CPU CSR kernels lack; the fp32 compute is the point here
    with warnings.catch_warnings(), torch.autocast(inputs.device.type, enabled=False):
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        matrix = torch.sparse_csr_tensor(pattern.crow, pattern.col, vals.to(compute), (pattern.rows, pattern.cols),
                                         check_invariants=False)
        product = torch.sparse.mm(matrix, inputs.t().to(compute))
    return product.t().to(inputs.dtype)


def increment_matmul(x: torch.Tensor, patterns: tuple[CsrPattern, CsrPattern], values: torch.Tensor) -> torch.Tensor:
    """``x @ S^T``: (tokens, in) -> (tokens, out)."""
    return csr_matmul_t(x, patterns[0], values)


def increment_matmul_transposed(grad: torch.Tensor, patterns: tuple[CsrPattern, CsrPattern],
                                values: torch.Tensor) -> torch.Tensor:
    """``grad @ S``: (tokens, out) -> (tokens, in), the increment's share of the input gradient."""
    return csr_matmul_t(grad, patterns[1], values)
