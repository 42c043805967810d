"""Triton kernels for the sparse increment: the values' gradient (a sampled product) and ``x @ S^T``.

Imported only when triton is importable (CUDA torch ships it; CPU torch does not). With
``TRITON_INTERPRET=1`` set before triton is first imported (so at process start: torch._dynamo, which
transformers imports, imports triton), the kernels run through Triton's interpreter on CPU tensors (tests).

**Design.** Both kernels work on the tiles of a :class:`~sift_llm.sift.kernels.plan.TilePlan`: ``BR``
consecutive weight rows (a row group) by ``BU`` columns taken from the sorted union of the columns that the
group's rows select.

- Values' gradient, one program per tile: ``acc[BU, BR] = x^T[union cols, :] @ grad_out[:, rows]``, looping
  over the tokens in blocks of ``BT`` on the tensor cores (fp32 accumulation), then each selected entry of
  the tile is stored to its place in the values vector, found from the tile's row masks (a cumsum along
  the tile's columns plus the row's first position). The union columns of x are gathered as rows of a
  contiguous x^T (each a ``BT``-token contiguous segment), the ``BR`` rows of grad_out are contiguous in
  its (tokens, out) layout, so every load is coalesced; nothing of size out x in exists.
- ``x @ S^T``, one program per (token block, row group): the dense ``[BU, BR]`` slice of S for each of the
  group's tiles is built in registers from the masks and the values, multiplied with the gathered columns
  of x, and accumulated over the group's tiles; each output element is written by one program (no atomics).

**Cost model (H100/H200, bf16; to be checked by measurement).** The dense path is one T x out x in GEMM at
~530 TFLOP/s (measured: 0.35 ms for 11008 x 4096 x 2048 tokens), whose operand traffic from L2 is about
``T * out * in * 2 B / 88``. The tile kernel does ``BR * union`` dot products over T (tensor-core work is
far from the bound) and reads ``T * 2 B`` per union column of x plus ``T * 2 B * BR`` per tile of grad_out,
all from L2 (x^T and grad_out fit in the 50 MB L2), so it is L2-bandwidth bound: its time follows
``plan.load_ratio()`` (token-columns read per weight entry), against ~1/128 + 1/256 = 0.0117 for the dense
GEMM's 128 x 256 tiles. For a uniformly random pattern with ``BR = 16`` the union holds ~``1 - (1 - d)^16``
of the columns per group, and the load ratio is ~0.0055 at d = 0.5%, ~0.0105 at 1% and ~0.039 at 5%: about
2x faster than dense at 0.5%, even at 1%, ~3x slower at 5%. Gradient-selected patterns are clustered
(activation outlier channels put many rows' entries on the same columns): on SmolLM2-135M with one Alpaca
batch their load ratio at 1% is 0.004-0.009, i.e. 1.3-3x faster than dense by this model. The cost rule
(``layer.TRITON_MAX_DENSITY``, ``layer.TRITON_MAX_LOAD_RATIO``) holds these estimates until a GPU
measurement replaces them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sift_llm.sift.kernels.plan import PACK_SHIFT, TilePlan

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_T = 64
NUM_WARPS = 4
NUM_STAGES = 3


@triton.jit
def _exclusive_row_counts(bits):
    """For a [BU, BR] 0/1 tile: how many bits of the same column of ``bits`` are set above each entry."""
    return tl.cumsum(bits, 0) - bits


@triton.jit
def _tile_columns(union_ptr, mask_ptr, u, u_ok, PACKED: tl.constexpr, SHIFT: tl.constexpr):
    word = tl.load(union_ptr + u, mask=u_ok, other=0)
    if PACKED:
        cols = word >> SHIFT
        masks = word & ((1 << SHIFT) - 1)
    else:
        cols = word
        masks = tl.load(mask_ptr + u, mask=u_ok, other=0)
    return cols, masks


@triton.jit
def _values_grad_kernel(
    grad_ptr, xt_ptr, out_ptr, union_ptr, mask_ptr, tile_group_ptr, tile_start_ptr, tile_end_ptr, tile_pos_ptr,
    tokens, out_features, stride_gt, stride_gr, stride_xc, stride_xt,
    BR: tl.constexpr, BU: tl.constexpr, BT: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.load(tile_group_ptr + tile)
    u = tl.load(tile_start_ptr + tile) + tl.arange(0, BU)
    u_ok = u < tl.load(tile_end_ptr + tile)
    cols, masks = _tile_columns(union_ptr, mask_ptr, u, u_ok, PACKED, SHIFT)
    i = tl.arange(0, BR)
    rows = group * BR + i
    r_ok = rows < out_features
    x_rows = xt_ptr + cols.to(tl.int64)[:, None] * stride_xc
    g_cols = grad_ptr + rows.to(tl.int64)[None, :] * stride_gr
    acc = tl.zeros([BU, BR], dtype=tl.float32)
    for t0 in range(0, tokens, BT):
        t = t0 + tl.arange(0, BT)
        t_ok = t < tokens
        # tokens are x^T's contiguous axis: int32 offsets keep the loads' contiguity visible to the compiler
        xs = tl.load(x_rows + t[None, :] * stride_xt, mask=u_ok[:, None] & t_ok[None, :], other=0.0)
        gs = tl.load(g_cols + t[:, None].to(tl.int64) * stride_gt, mask=t_ok[:, None] & r_ok[None, :], other=0.0)
        if UPCAST:
            xs = xs.to(tl.float32)
            gs = gs.to(tl.float32)
        acc = tl.dot(xs, gs, acc, input_precision=PRECISION)
    bits = (masks[:, None] >> i[None, :]) & 1
    pos = tl.load(tile_pos_ptr + tile * BR + i)[None, :] + _exclusive_row_counts(bits)
    tl.store(out_ptr + pos, acc, mask=bits != 0)


@triton.jit
def _increment_kernel(
    xt_ptr, values_ptr, y_ptr, union_ptr, mask_ptr, group_tiles_ptr, tile_start_ptr, tile_end_ptr, tile_pos_ptr,
    tokens, out_features, stride_xc, stride_xt, stride_yt, stride_yr,
    BR: tl.constexpr, BU: tl.constexpr, BT: tl.constexpr, PACKED: tl.constexpr, SHIFT: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    group = tl.program_id(1)
    t_ok = t < tokens
    i = tl.arange(0, BR)
    rows = group * BR + i
    acc = tl.zeros([BT, BR], dtype=tl.float32)
    for tile in range(tl.load(group_tiles_ptr + group), tl.load(group_tiles_ptr + group + 1)):
        u = tl.load(tile_start_ptr + tile) + tl.arange(0, BU)
        u_ok = u < tl.load(tile_end_ptr + tile)
        cols, masks = _tile_columns(union_ptr, mask_ptr, u, u_ok, PACKED, SHIFT)
        bits = (masks[:, None] >> i[None, :]) & 1
        pos = tl.load(tile_pos_ptr + tile * BR + i)[None, :] + _exclusive_row_counts(bits)
        s = tl.load(values_ptr + pos, mask=bits != 0, other=0.0)
        xs = tl.load(xt_ptr + cols.to(tl.int64)[None, :] * stride_xc + t[:, None] * stride_xt,
                     mask=t_ok[:, None] & u_ok[None, :], other=0.0)
        s = s.to(xs.dtype)
        if UPCAST:
            xs = xs.to(tl.float32)
            s = s.to(tl.float32)
        acc = tl.dot(xs, s, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + t[:, None].to(tl.int64) * stride_yt + rows.to(tl.int64)[None, :] * stride_yr
    y_ok = t_ok[:, None] & (rows < out_features)[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def interpreting() -> bool:
    """Whether the kernels were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_values_grad_kernel).__name__ == "InterpretedFunction"


def _check(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype not in DTYPES:
        raise ValueError(f"the Triton kernels take bf16, fp16 or fp32 {what}, got {tensor.dtype}")
    if tensor.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton kernels run on CUDA tensors (or under TRITON_INTERPRET=1), got {what} on "
                         f"{tensor.device}")


def _modes(dtype: torch.dtype) -> tuple[bool, str]:
    # The interpreter's bf16 dot is wrong (numpy has no bf16): it multiplies fp32 copies, which is exact too.
    # fp32 inputs use the full-precision dot, not TF32, so every path gives the same gradient.
    upcast = interpreting()
    precision = "ieee" if upcast or dtype == torch.float32 else "tf32"
    return upcast, precision


def values_grad(grad: torch.Tensor, x: torch.Tensor, plan: TilePlan, *, block_t: int = BLOCK_T,
                num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """``(grad^T @ x).flatten()[indices]`` in fp32 for (tokens, out) ``grad`` and (tokens, in) ``x``."""
    _check(grad, "gradients")
    _check(x, "inputs")
    tokens = grad.shape[0]
    if grad.shape != (tokens, plan.out_features) or x.shape != (tokens, plan.in_features):
        raise ValueError(f"shapes {tuple(grad.shape)} and {tuple(x.shape)} do not fit the "
                         f"{plan.out_features}x{plan.in_features} plan")
    out = torch.empty(plan.k, dtype=torch.float32, device=grad.device)
    if plan.tiles == 0 or tokens == 0:
        return out.zero_()
    x_t = x.t().contiguous()
    upcast, precision = _modes(grad.dtype)
    _values_grad_kernel[(plan.tiles,)](
        grad, x_t, out, plan.union, plan.union if plan.masks is None else plan.masks, plan.tile_group,
        plan.tile_start, plan.tile_end, plan.tile_pos,
        tokens, plan.out_features, grad.stride(0), grad.stride(1), x_t.stride(0), x_t.stride(1),
        BR=plan.group_rows, BU=plan.tile_cols, BT=block_t, PACKED=plan.packed, SHIFT=PACK_SHIFT,
        UPCAST=upcast, PRECISION=precision, num_warps=num_warps, num_stages=num_stages,
    )
    return out


def increment_matmul(x: torch.Tensor, plan: TilePlan, values: torch.Tensor, out: torch.Tensor | None = None, *,
                     block_t: int = BLOCK_T, num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES) -> torch.Tensor:
    """``x @ S^T`` for (tokens, in) ``x``; with ``out`` (tokens, out_features) given, ``out += x @ S^T`` in place
    (the sum taken in fp32, rounded once to ``out``'s dtype). The values go through x's dtype on the
    tensor cores (bf16 rounding of the increment, never of W + increment)."""
    _check(x, "inputs")
    tokens = x.shape[0]
    if x.shape != (tokens, plan.in_features) or values.numel() != plan.k:
        raise ValueError(f"x {tuple(x.shape)} and {values.numel()} values do not fit the "
                         f"{plan.out_features}x{plan.in_features} plan of {plan.k} entries")
    accumulate = out is not None
    if out is None:
        out = torch.empty(tokens, plan.out_features, dtype=x.dtype, device=x.device)
    elif out.shape != (tokens, plan.out_features):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {(tokens, plan.out_features)}")
    if tokens == 0:
        return out
    x_t = x.t().contiguous()
    values = values.detach().contiguous()
    upcast, precision = _modes(x.dtype)
    grid = (triton.cdiv(tokens, block_t), plan.groups)
    _increment_kernel[grid](
        x_t, values, out, plan.union, plan.union if plan.masks is None else plan.masks, plan.group_tiles,
        plan.tile_start, plan.tile_end, plan.tile_pos,
        tokens, plan.out_features, x_t.stride(0), x_t.stride(1), out.stride(0), out.stride(1),
        BR=plan.group_rows, BU=plan.tile_cols, BT=block_t, PACKED=plan.packed, SHIFT=PACK_SHIFT,
        UPCAST=upcast, PRECISION=precision, ACCUMULATE=accumulate, num_warps=num_warps, num_stages=num_stages,
    )
    return out
