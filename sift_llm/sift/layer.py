"""The sparse-increment Linear: a frozen base weight plus trainable values at fixed flat indices.

A targeted ``nn.Linear`` is turned into a :class:`SiftLinear` in place (its class is swapped), so ``weight``,
``bias`` and the new ``values`` stay parameters of the same module: DeepSpeed ZeRO-3 gathers a module's own
parameters around its forward and backward, and the base weights keep their state-dict keys.

The forward computes ``F.linear(x, W + scatter(values), bias)`` through a custom autograd Function whose
backward returns the gradient of ``values`` (and of ``x``) only.

- The effective weight ``W + scatter(values)`` is formed by patching the frozen weight at the k selected
  positions for the duration of one product and restoring those entries bit for bit afterwards: O(k) work
  and memory instead of a transient dense copy of W (layer option ``merge="clone"`` keeps the copy). With
  ``merge="increment"`` W is never touched: the output is ``x @ W^T + x @ S^T`` with the sparse product
  computed on its own (the path a quantized base needs).
- The values' gradient ``(grad_out^T @ x)[indices]`` takes one of three exact paths, chosen per layer by a
  per-device cost rule (:func:`values_grad_path`, layer option ``values_grad``): a Triton tile kernel
  (CUDA, :mod:`sift_llm.sift.kernels.triton_ops`) or a sampled product (SDDMM, ``torch.sparse.sampled_addmm``),
  both costing about density x the dense product, or the dense product computed one block of output rows at
  a time, gathered at the indices and freed (row blocks holding no selected entry are skipped). The dense
  weight gradient is never materialised whole on any path.

The layer options come from :class:`~sift_llm.sift.config.SiftConfig` (``values_grad``, ``merge``) through
:func:`~sift_llm.sift.model.attach_sift`; there are no process-wide switches.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from sift_llm.errors import UserError
from sift_llm.sift import kernels

# Upper bound on the entries of one transient weight-gradient block (64 MiB in fp32).
GRAD_BLOCK_ELEMENTS = 1 << 24

# The values' gradient paths (layer option ``values_grad``): "auto" applies the cost rule below, the others
# force one path. Every path computes the same gradient.
VALUES_GRAD_PATHS = ("auto", "dense", "sampled", "triton")
# How W + scatter(values) enters the products (layer option ``merge``): "patch" (in place at the k
# positions, restored), "clone" (a transient dense copy) or "increment" (W untouched, a separate sparse product).
MERGE_PATHS = ("patch", "clone", "increment")
# Below this density (selected / matrix entries) the sampled product beats the dense row-block product on
# that device type; device types not listed never take it. The dense product runs near the matrix units'
# peak while the sampled one is bound by gathering, so the crossover is far lower on a GPU.
# Measured with `sift-llm bench --only kernels` (benchmarks/README.md): on 2 CPU cores the sampled path
# won up to ~10% density; on an H100 in bf16 torch's sampled product lost at every density measured (0.1%-5%).
SAMPLED_MAX_DENSITY = {"cpu": 0.08}
# The Triton tile kernel takes the values' gradient on a device type (when triton is importable) below this
# density, and there only when the pattern's load ratio (TilePlan.load_ratio: token-columns the kernel reads
# per weight entry, which its L2-bound time follows) is below the second threshold; the dense GEMM reads about
# 1/128 + 1/256 = 0.0117 per entry. NOT YET MEASURED ON A GPU: both are set from the traffic model in
# sift_llm/sift/kernels/triton_ops.py. A uniformly random pattern has a load ratio of ~0.011 at 1% (even with
# dense) and ~0.0055 at 0.5%; SIFT's gradient-selected patterns are clustered (SmolLM2-135M, one Alpaca batch:
# 0.004-0.009 at 1%, 0.016-0.029 at 5%). Replace both with what `scripts/gpu_checks.sh` measures.
TRITON_MAX_DENSITY = {"cuda": 0.02}
TRITON_MAX_LOAD_RATIO = {"cuda": 0.01}
# Tile shape of the Triton kernels' plan (rows per group, union columns per tile); see kernels/plan.py.
TRITON_GROUP_ROWS = 16
TRITON_TILE_COLS = 128


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices when every flat position of the matrix fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit Linear (``Linear4bit``, as transformers' 4-bit loading makes it).

    Never imports bitsandbytes: a model can only hold such a module once something else has imported it.
    """
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def base_values(module, positions: torch.Tensor) -> torch.Tensor:
    """The base weight's values at flat row-major ``positions`` (on the weight's device, in its dtype).

    For a 4-bit module: of its dequantized weight, formed for this one matrix and dropped
    (:func:`sift_llm.sift.quantized.dequantized_weight`). ``module`` only needs a ``weight`` otherwise.
    """
    if is_4bit(module):
        from sift_llm.sift.quantized import dequantized_weight

        weight = dequantized_weight(module)
        return weight.reshape(-1).index_select(0, positions.long().to(weight.device))
    weight = module.weight.detach()
    return weight.reshape(-1).index_select(0, positions.long().to(weight.device))


def base_dtype(module) -> torch.dtype:
    """The dtype of :func:`base_values`: the weight's, or for a 4-bit module the dtype it dequantizes to."""
    if is_4bit(module):
        return module.weight.quant_state.dtype
    return module.weight.dtype


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


@contextlib.contextmanager
def effective_weight(
    weight: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, merge: str = "patch"
) -> Iterator[torch.Tensor]:
    """``weight + scatter(values)`` for the body of the ``with`` block, equal bit for bit to :func:`merged_weight`.

    By default the frozen weight itself is patched at the selected positions (the sum rounded exactly as
    :func:`add_increment_` rounds it) and the saved original entries are written back on exit, so no dense
    copy is made. The patch goes through ``weight.data``, whose version counter is not the one autograd
    checks for the tensor it saved. Products issued inside the block are ordered before the restore (CPU
    ops are synchronous; CUDA ops share one stream). A non-contiguous weight, or ``merge="clone"``,
    gets a transient dense copy instead.
    """
    if merge == "clone" or not weight.is_contiguous():
        yield merged_weight(weight, values, indices)
        return
    flat = weight.data.view(-1)
    original = flat.index_select(0, indices)
    wide = torch.promote_types(flat.dtype, torch.float32)
    flat.index_put_((indices,), (original.to(wide) + values.detach().to(wide)).to(flat.dtype))
    try:
        yield weight.data
    finally:
        flat.index_put_((indices,), original)


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


def sddmm_values_grad(grad_out: torch.Tensor, inputs: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """``(grad_out^T @ inputs).flatten()[indices]`` as a sampled dense-dense product: only the k selected dot
    products over the tokens are computed (``torch.sparse.sampled_addmm`` on a CSR pattern of the indices).

    ``indices`` are sorted flat row-major positions, so the CSR value order is the indices' order. The result
    is in ``grad_out``'s dtype; dtypes the sparse kernel lacks (bf16/fp16 on CPU) are computed in fp32.
    """
    out_features = grad_out.shape[1]
    dtype = grad_out.dtype
    compute = dtype if _sampled_supports(grad_out.device.type, dtype) else torch.float32
    edges = torch.arange(out_features + 1, device=indices.device, dtype=indices.dtype) * in_features
    crow = torch.searchsorted(indices, edges).to(indices.dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        pattern = torch.sparse_csr_tensor(
            crow, indices % in_features, torch.zeros(indices.numel(), dtype=compute, device=indices.device),
            (out_features, in_features), check_invariants=False,
        )
    grad = torch.sparse.sampled_addmm(pattern, grad_out.t().to(compute), inputs.to(compute), beta=0.0)
    return grad.values().to(dtype)


@functools.lru_cache(maxsize=None)
def _sampled_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.sparse.sampled_addmm`` runs in ``dtype`` on this device type (tried once on a 2x2)."""
    if dtype in (torch.float32, torch.float64):
        return True
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            eye = torch.eye(2, dtype=dtype, device=device_type).to_sparse_csr()
            torch.sparse.sampled_addmm(eye, eye.to_dense(), eye.to_dense(), beta=0.0)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def values_grad_path(numel: int, k: int, device: torch.device, requested: str = "auto",
                     dtype: torch.dtype | None = None, load_ratio: Callable[[], float] | None = None) -> str:
    """"triton", "sampled" or "dense": the cheaper exact way to compute ``k`` of ``numel`` weight-gradient
    entries on ``device`` (in ``dtype``), or the ``requested`` path when it is not "auto".

    The Triton and sampled products cost about ``k / numel`` of the dense one in arithmetic but run at gather
    speed, so each wins below a device-dependent density: :data:`TRITON_MAX_DENSITY` (with triton installed,
    a bf16/fp16/fp32 gradient and, when ``load_ratio`` is given, the pattern's load ratio below
    :data:`TRITON_MAX_LOAD_RATIO`; it is only called past the other checks), then :data:`SAMPLED_MAX_DENSITY`.
    """
    if requested not in VALUES_GRAD_PATHS:
        raise ValueError(f"values_grad must be one of {', '.join(VALUES_GRAD_PATHS)}, got {requested!r}")
    if requested != "auto":
        return requested
    triton_dtype = dtype is None or dtype in (torch.bfloat16, torch.float16, torch.float32)
    if (k < TRITON_MAX_DENSITY.get(device.type, 0.0) * numel and triton_dtype and kernels.triton_usable(device)
            and (load_ratio is None or load_ratio() < TRITON_MAX_LOAD_RATIO.get(device.type, 0.0))):
        return "triton"
    return "sampled" if k < SAMPLED_MAX_DENSITY.get(device.type, 0.0) * numel else "dense"


def _require_triton(layer: SiftLinear, device: torch.device) -> None:
    if not kernels.triton_usable(device):
        why = "triton is not installed" if not kernels.triton_importable() else f"the tensors are on {device}"
        raise UserError(
            f"{layer.sift_name}: values_grad 'triton' needs CUDA tensors and the triton package ({why}); "
            "use values_grad 'auto' to let the cost rule pick a path"
        )


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
        if ctx.observer is not None:
            return F.linear(x, weight, bias)
        if layer.merge == "increment":
            out = F.linear(x, weight, bias)
            layer.increment_product(x.reshape(-1, x.shape[-1]).to(out.dtype), values, out.view(-1, out.shape[-1]))
            return out
        with effective_weight(weight, values, indices, layer.merge) as effective:
            return F.linear(x, effective, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, values, indices = ctx.saved_tensors
        # Under autocast the output (and so grad_out) may be narrower than x and W: compute in its dtype.
        dtype = grad_out.dtype
        grad_x = grad_values = None
        layer = ctx.layer
        if ctx.needs_input_grad[0]:
            if ctx.observer is not None:
                grad_x = (grad_out @ weight.to(dtype)).to(x.dtype)
            elif layer.merge == "increment":
                grad_x = grad_out @ weight.to(dtype)
                layer.increment_product(grad_out.reshape(-1, grad_out.shape[-1]), values,
                                        grad_x.view(-1, grad_x.shape[-1]), transposed=True)
                grad_x = grad_x.to(x.dtype)
            else:
                with effective_weight(weight, values, indices, layer.merge) as effective:
                    grad_x = (grad_out @ effective.to(dtype)).to(x.dtype)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.observer is not None:
            # Calibration: the selector forms and scores this matrix's gradient (in fp32), then drops it;
            # the values get no gradient.
            ctx.observer.observe(ctx.layer, grad_2d, x.reshape(-1, x.shape[-1]), weight)
            return grad_x, None, None, None, None, None, None
        x_2d = x.reshape(-1, x.shape[-1]).to(dtype)
        if ctx.needs_input_grad[3]:
            grad_values = values_gradient(layer, grad_2d, x_2d, indices).to(values.dtype)
        return grad_x, None, None, grad_values, None, None, None


def values_gradient(layer: SiftLinear, grad_2d: torch.Tensor, x_2d: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(grad_out^T @ x).flatten()[indices]`` in ``grad_2d``'s dtype by the path the layer's cost rule picks
    (2-D ``grad_2d`` (tokens, out) and ``x_2d`` (tokens, in) of the same dtype); needs no weight."""
    dtype = grad_2d.dtype
    path = values_grad_path(layer.numel_weight, indices.numel(), grad_2d.device, layer.values_grad, dtype,
                            layer.load_ratio)
    if path == "triton":
        _require_triton(layer, grad_2d.device)
        return kernels.load_triton_ops().values_grad(grad_2d, x_2d, layer.tile_plan())
    if path == "sampled":
        return sddmm_values_grad(grad_2d, x_2d, indices, layer.in_features)
    return sampled_weight_grad(grad_2d, x_2d, indices, layer.row_blocks())


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
    def convert(cls, linear: nn.Linear, name: str, k: int, values_dtype: torch.dtype, *, values_grad: str = "auto",
                merge: str = "patch") -> SiftLinear:
        """Turn ``linear`` into a SiftLinear in place with room for ``k`` values (all zero, not yet selected).

        ``values_grad`` and ``merge`` choose the layer's kernels (:data:`VALUES_GRAD_PATHS`, :data:`MERGE_PATHS`).
        """
        cls._check_convertible(linear, name)
        numel = linear.in_features * linear.out_features
        if not 0 <= k <= numel:
            raise ValueError(f"{name}: cannot select {k} of {numel} entries")
        if values_grad not in VALUES_GRAD_PATHS:
            raise ValueError(f"{name}: values_grad must be one of {', '.join(VALUES_GRAD_PATHS)}, got {values_grad!r}")
        if merge not in MERGE_PATHS:
            raise ValueError(f"{name}: merge must be one of {', '.join(MERGE_PATHS)}, got {merge!r}")
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
        linear.values_grad = values_grad
        linear.merge = merge
        linear._kernel_key = None
        linear._kernel_cache = {}
        return linear

    @classmethod
    def _check_convertible(cls, linear: nn.Module, name: str) -> None:
        """Refuse a module this class cannot take over (SiftLinear: exactly nn.Linear)."""
        if type(linear) is not nn.Linear:
            raise UserError(f"{name}: SIFT targets plain nn.Linear modules (or bitsandbytes 4-bit Linear4bit), "
                            f"got {type(linear).__name__}")

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
        self._kernel_key = None
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

    def _kernel_state(self, name: str, build):
        """A per-selection structure of the kernels (plans, CSR patterns), built once and cached like
        :meth:`row_blocks`; not part of the state dict."""
        indices = self.indices
        key = (indices._version, indices.numel(), indices.data_ptr(), indices.device)
        if key != self._kernel_key:
            self._kernel_cache = {}
            self._kernel_key = key
        if name not in self._kernel_cache:
            self._kernel_cache[name] = build()
        return self._kernel_cache[name]

    def tile_plan(self, transposed: bool = False) -> kernels.TilePlan:
        """The Triton kernels' tile plan of the indices (or of S^T's, for the input gradient's product)."""
        if not transposed:
            return self._kernel_state("plan", lambda: kernels.build_tile_plan(
                self.indices, self.out_features, self.in_features, TRITON_GROUP_ROWS, TRITON_TILE_COLS))

        def build():
            indices_t, perm = kernels.transposed_pattern(self.indices, self.out_features, self.in_features)
            plan = kernels.build_tile_plan(indices_t, self.in_features, self.out_features, TRITON_GROUP_ROWS,
                                           TRITON_TILE_COLS)
            return plan, perm
        return self._kernel_state("plan_t", build)

    def load_ratio(self) -> float:
        """The tile plan's load ratio (the Triton kernel's traffic per weight entry), cached per selection. The
        plan itself stays cached only while the cost rule picks the Triton path."""
        def build():
            plan_cached = "plan" in self._kernel_cache
            ratio = self.tile_plan().load_ratio()
            if not plan_cached and not ratio < TRITON_MAX_LOAD_RATIO.get(self.weight.device.type, 0.0):
                self._kernel_cache.pop("plan")
            return ratio
        return self._kernel_state("load_ratio", build)

    def _increment_on_triton(self, tensor: torch.Tensor) -> bool:
        if self.values_grad == "triton":
            _require_triton(self, tensor.device)
            return True
        return (self.values_grad == "auto" and tensor.device.type == "cuda"
                and tensor.dtype in (torch.bfloat16, torch.float16, torch.float32) and kernels.triton_usable(tensor.device))

    def increment_product(self, inputs: torch.Tensor, values: torch.Tensor, out: torch.Tensor,
                          transposed: bool = False) -> None:
        """``out += inputs @ S^T`` (``transposed``: ``out += inputs @ S``) for the sparse increment S, with 2-D
        ``inputs`` and ``out`` (tokens first): the Triton kernel where it runs, else a CSR product."""
        if self.k == 0:
            return
        if self._increment_on_triton(inputs):
            ops = kernels.load_triton_ops()
            if transposed:
                plan, perm = self.tile_plan(transposed=True)
                values = values.detach()[perm]
            else:
                plan = self.tile_plan()
            ops.increment_matmul(inputs.contiguous(), plan, values, out)
            return
        patterns = self._kernel_state("csr", lambda: kernels.increment_patterns(
            self.indices, self.out_features, self.in_features))
        product = (kernels.increment_matmul_transposed if transposed else kernels.increment_matmul)(
            inputs, patterns, values)
        out.add_(product.to(out.dtype))

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
            self._kernel_key = None
            self.selected = True

    def fold_and_revert(self) -> nn.Linear:
        """Add the increment into the weight (fp32 sum, cast back) and turn the module back into nn.Linear."""
        with torch.no_grad():
            add_increment_(self.weight.data.view(-1), self.indices, self.values)
        for attr in ("values", "indices"):
            delattr(self, attr)
        for attr in ("sift_name", "selected", "_observer", "_blocks_key", "_blocks", "values_grad", "merge",
                     "_kernel_key", "_kernel_cache"):
            self.__dict__.pop(attr, None)
        self.__class__ = nn.Linear
        return self

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, selected={self.k}, density={self.k / self.numel_weight:.4g}, "
                f"values_grad={self.values_grad}, merge={self.merge}")
