"""The sparse-increment Linear: a frozen base weight plus trainable values at fixed flat indices.

A targeted ``nn.Linear`` is turned into a :class:`SiftLinear` in place (its class is swapped), so ``weight``,
``bias`` and the new ``values`` stay parameters of the same module: DeepSpeed ZeRO-3 gathers a module's own
parameters around its forward and backward, and the base weights keep their state-dict keys.

The forward computes ``F.linear(x, W + scatter(values), bias)`` through a custom autograd Function whose
backward returns the gradient of ``values`` (and of ``x``) only. The dense weight gradient is never
materialised whole during training: it is computed one block of output rows at a time, gathered at the
selected indices and freed, and row blocks holding no selected entry are skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sift_llm.errors import UserError

# Upper bound on the entries of one transient weight-gradient block (64 MiB in fp32).
GRAD_BLOCK_ELEMENTS = 1 << 24


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices when every flat position of the matrix fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def add_increment_(flat_weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """``flat_weight[indices] += values`` with the sum taken in at least fp32 and rounded once to the weight dtype.

    Training forwards and :func:`merge_into_base` both go through here, so a merged model reproduces the
    trained model's weights bit for bit.
    """
    wide = torch.promote_types(flat_weight.dtype, torch.float32)
    summed = flat_weight.index_select(0, indices).to(wide) + values.detach().to(wide)
    flat_weight.index_put_((indices,), summed.to(flat_weight.dtype))


def merged_weight(weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """A transient dense copy of ``weight + scatter(values)``."""
    merged = weight.detach().clone(memory_format=torch.contiguous_format)
    add_increment_(merged.view(-1), indices, values)
    return merged


def sampled_weight_grad(
    grad_out: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor, blocks: list[tuple[int, int, int, int]]
) -> torch.Tensor:
    """``(grad_out^T @ inputs).flatten()[indices]`` computed one row block at a time.

    ``grad_out`` is (tokens, out), ``inputs`` (tokens, in); each block is (first row, end row, first index
    position, end index position) and covers only rows that hold selected entries.
    """
    in_features = inputs.shape[1]
    grad = torch.empty(indices.numel(), dtype=grad_out.dtype, device=grad_out.device)
    for row0, row1, pos0, pos1 in blocks:
        block = grad_out[:, row0:row1].t() @ inputs
        grad[pos0:pos1] = block.view(-1).index_select(0, indices[pos0:pos1] - row0 * in_features)
    return grad


class _SparseIncrementLinear(torch.autograd.Function):
    """y = x @ (W + scatter(values))^T + b, differentiable in x and values only.

    ``probe`` is a grad-requiring scalar that a calibrating Selector passes in while every parameter is
    frozen: it makes autograd run this backward without DeepSpeed or an optimizer seeing any gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, values, indices, probe, layer):
        ctx.layer = layer
        ctx.observer = layer._observer
        ctx.save_for_backward(x, weight, values, indices)
        # While calibrating the values are still zero, so the base weight is the effective weight.
        effective = weight if ctx.observer is not None else merged_weight(weight, values, indices)
        return F.linear(x, effective, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        # Under autocast the output (and so grad_out) may be narrower than x and W: compute in its dtype.
        dtype = grad_out.dtype
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            effective = weight if ctx.observer is not None else merged_weight(weight, values, indices)
            grad_x = (grad_out @ effective.to(dtype)).to(x.dtype)
            del effective
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1]).to(dtype)
        if ctx.observer is not None:
            # Calibration: score this matrix's dense gradient now, then drop it; the values get no gradient.
            ctx.observer.observe(ctx.layer, grad_2d.t() @ x_2d, weight)
        elif ctx.needs_input_grad[3]:
            grad_values = sampled_weight_grad(grad_2d, x_2d, indices, ctx.layer.row_blocks()).to(values.dtype)
        return grad_x, None, None, grad_values, None, None, None


class SiftLinear(nn.Linear):
    """An ``nn.Linear`` whose frozen weight carries a trainable sparse increment.

    Made only by :meth:`convert` from an existing ``nn.Linear`` (the module object is kept). Adds the
    parameter ``values`` (1-D, one entry per selected position; an empty buffer when nothing is selected)
    and the buffer ``indices`` (sorted flat row-major positions into the weight, int32 when the matrix
    has fewer than 2^31 entries).
    """

    values: nn.Parameter
    indices: torch.Tensor

    @classmethod
    def convert(cls, linear: nn.Linear, name: str, k: int, values_dtype: torch.dtype) -> SiftLinear:
        """Turn ``linear`` into a SiftLinear in place with room for ``k`` values (all zero, not yet selected)."""
        if type(linear) is not nn.Linear:
            raise UserError(f"{name}: SIFT targets plain nn.Linear modules, got {type(linear).__name__}")
        numel = linear.in_features * linear.out_features
        if not 0 <= k <= numel:
            raise ValueError(f"{name}: cannot select {k} of {numel} entries")
        device = linear.weight.device
        linear.__class__ = cls
        linear.weight.requires_grad_(False)
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        linear._install_values(k, values_dtype, device)
        # Placeholder positions until selection; forward refuses to train on them (see ``selected``).
        linear.register_buffer("indices", torch.arange(k, dtype=index_dtype(numel), device=device))
        linear.sift_name = name
        linear.selected = False
        linear._observer = None
        linear._blocks_key = None
        linear._blocks = []
        return linear

    @property
    def numel_weight(self) -> int:
        return self.in_features * self.out_features

    @property
    def k(self) -> int:
        """Number of selected entries (also under ZeRO-3, where the local ``values`` tensor is a shard)."""
        return self.indices.numel()

    def set_selection(self, indices: torch.Tensor) -> None:
        """Fix the trainable positions (sorted, unique flat indices) and reset the values to zero.

        A different count replaces ``values`` with a new parameter, so it must happen before an optimizer
        or a DeepSpeed engine holds the old one.
        """
        indices = indices.reshape(-1)
        n = self.numel_weight
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
            raise ValueError(f"{self.sift_name}: indices must lie in [0, {n})")
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise ValueError(f"{self.sift_name}: indices must be sorted and unique")
        device = self.weight.device
        count = indices.numel()
        if hasattr(self.values, "ds_id"):
            # A DeepSpeed ZeRO-3 shard: its size is fixed, and it still holds the zeros it was created with.
            if count != self.k:
                raise RuntimeError(
                    f"{self.sift_name}: the selection changes the number of values after DeepSpeed partitioned "
                    "them; with scope 'global' run the selection before deepspeed.initialize"
                )
        elif count != self.values.numel():
            self._install_values(count, self.values.dtype, device)
        else:
            with torch.no_grad():
                self.values.zero_()
        self.indices = indices.to(device=device, dtype=index_dtype(n))
        self._blocks_key = None
        self.selected = True

    def _install_values(self, count: int, dtype: torch.dtype, device: torch.device) -> None:
        """Zero values as a trainable parameter; with nothing selected, an empty buffer instead (DeepSpeed
        ZeRO-3 cannot gather zero-size parameters, and the optimizer has nothing to train there)."""
        if hasattr(self, "values"):
            delattr(self, "values")
        zeros = torch.zeros(count, dtype=dtype, device=device)
        if count:
            self.register_parameter("values", nn.Parameter(zeros))
        else:
            self.register_buffer("values", zeros, persistent=False)

    def row_blocks(self) -> list[tuple[int, int, int, int]]:
        """Row blocks of the weight holding selected entries, as (row0, row1, pos0, pos1).

        Cached: computing them syncs with the device. The cache is dropped when the indices are replaced
        and keyed on their version counter, which any in-place write (e.g. ``load_state_dict``) bumps.
        """
        indices = self.indices
        key = (indices._version, indices.numel(), GRAD_BLOCK_ELEMENTS)
        if key != self._blocks_key:
            rows_per_block = max(1, GRAD_BLOCK_ELEMENTS // self.in_features)
            starts = list(range(0, self.out_features, rows_per_block)) + [self.out_features]
            edges = torch.tensor([r * self.in_features for r in starts], dtype=torch.int64, device=indices.device)
            positions = torch.searchsorted(indices.to(torch.int64), edges).tolist()
            self._blocks = [
                (starts[i], starts[i + 1], positions[i], positions[i + 1])
                for i in range(len(starts) - 1)
                if positions[i + 1] > positions[i]
            ]
            self._blocks_key = key
        return self._blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is None:
            if not self.selected:
                raise RuntimeError(
                    f"{self.sift_name}: no sparse selection yet; calibrate and finalize a Selector, "
                    "load an adapter, or load a checkpoint first"
                )
            if self.k == 0:
                return F.linear(x, self.weight, self.bias)
        if self.weight.requires_grad:
            raise RuntimeError(f"{self.sift_name}: the base weight of a SIFT layer must stay frozen")
        probe = None if self._observer is None else self._observer.probe
        return _SparseIncrementLinear.apply(x, self.weight, self.bias, self.values, self.indices, probe, self)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Loading a checkpoint that holds indices restores a finished selection (resume).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "indices" in state_dict:
            self._blocks_key = None
            self.selected = True

    def fold_and_revert(self) -> nn.Linear:
        """Add the increment into the weight (fp32 sum, cast back) and turn the module back into nn.Linear."""
        with torch.no_grad():
            add_increment_(self.weight.data.view(-1), self.indices, self.values)
        for attr in ("values", "indices"):
            delattr(self, attr)
        for attr in ("sift_name", "selected", "_observer", "_blocks_key", "_blocks"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, selected={self.k}, density={self.k / self.numel_weight:.4g}"
