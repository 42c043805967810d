"""SIFT on a 4-bit base: bitsandbytes NF4/FP4 weights with fp32 sparse increments.

transformers' 4-bit loading (``BitsAndBytesConfig(load_in_4bit=True)``) turns every Linear but lm_head into a
``bitsandbytes.nn.Linear4bit`` whose ``weight`` is a ``Params4bit``: packed 4-bit codes plus a ``quant_state``
(block scales, code book, original shape and dtype). Such a weight cannot be patched at k positions, and
bitsandbytes computes no weight gradient for it. :class:`SiftLinear4bit` (made in place from a Linear4bit, as
:class:`~sift_llm.sift.layer.SiftLinear` is from an nn.Linear) therefore computes

    y = matmul_4bit(x, W4) + x @ S^T        (S: the sparse increment, fp32 ``values`` at sorted flat ``indices``)

- the frozen 4-bit product, forward and input gradient, goes through bitsandbytes' own ``bnb.matmul_4bit``
  (its backward dequantizes the one matrix for ``grad_out @ W`` and drops it, as under QLoRA);
- the increment's product goes through the sparse path every SIFT layer uses (CSR reference, Triton on CUDA),
  and :class:`_AddIncrement` adds it to the 4-bit product's output; its backward returns the
  increment's share of the input gradient (``grad_out @ S``) and the values' gradient, ``(grad_out^T x)`` at
  the indices (:func:`~sift_llm.sift.layer.values_gradient`), which needs no dense weight;
- in calibration the selector receives ``grad_out`` and ``x`` as from any SIFT layer; the metrics that read the
  weight (snip, weight_abs) get this matrix dequantized for the call and dropped (:func:`dequantized_weight`).

No full-precision copy of a matrix outlives one layer's call. The base content of an adapter (its fingerprint of
the base values at the selected positions) is taken on the dequantized weights, one matrix at a time.

This module imports bitsandbytes; :mod:`sift_llm.sift` imports it only when a model holds 4-bit Linears.
"""

from __future__ import annotations

import warnings

import bitsandbytes as bnb
import torch
from bitsandbytes.nn import Linear4bit
from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module
from torch import nn

from sift_llm.errors import UserError
from sift_llm.sift import kernels
from sift_llm.sift.layer import SiftLinear, add_increment_, values_gradient

QUANT_TYPES = ("nf4", "fp4")
# Selection metrics that read the base weight itself (sift_llm.sift.selection): a 4-bit layer dequantizes its
# matrix for the one call that scores it.
WEIGHT_METRICS = ("snip", "weight_abs")
# What Linear4bit adds to an nn.Linear's attributes; dropped when a layer is folded back into an nn.Linear.
_LINEAR4BIT_ATTRS = ("quant_state", "compute_dtype", "compute_type_is_set", "quant_storage",
                     "support_avx512bf16_for_cpu")
_SIFT_ATTRS = ("sift_name", "selected", "_observer", "_blocks_key", "_blocks", "values_grad", "merge", "_kernel_key",
               "_kernel_cache")


def _canonical(module: nn.Module):
    """The module's 4-bit weight and quant state in bitsandbytes' canonical layout.

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients repacks the weight in
    place for its inference kernel; turn it back (as bitsandbytes itself does before saving) so it dequantizes.
    """
    fix_4bit_weight_quant_state_from_module(module)
    weight = module.weight
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = module.quant_state = state
    return weight, state


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """A transient dense (out, in) copy of a 4-bit module's weight, in the dtype it was quantized from.

    The caller drops it after use; it is never stored on the module. Under ZeRO-3 gather the weight first.
    """
    weight, state = _canonical(module)
    with torch.no_grad():
        return bnb.functional.dequantize_4bit(weight.data, state)


def quantization_record(modules) -> dict:
    """How the 4-bit base was quantized, as an adapter records it: one setting shared by every module.

    Keys: library, quant_type (nf4/fp4), double_quant, blocksize, dtype (what the weights dequantize to),
    compute_dtype and quant_storage.
    """
    rows = set()
    for module in modules:
        _, state = _canonical(module)
        compute = getattr(module, "compute_dtype", None)
        rows.add((state.quant_type, bool(state.nested), int(state.blocksize), _name(state.dtype),
                  _name(compute) if compute is not None else None, _name(module.weight.dtype)))
    if len(rows) != 1:
        raise UserError(f"the targeted 4-bit modules are quantized in {len(rows)} different ways ({sorted(rows, key=str)[:3]}); "
                        "SIFT needs one quantization for the whole base")
    quant_type, nested, blocksize, dtype, compute, storage = rows.pop()
    return {"library": "bitsandbytes", "quant_type": quant_type, "double_quant": nested, "blocksize": blocksize,
            "dtype": dtype, "compute_dtype": compute, "quant_storage": storage}


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _csr_patterns(layer: SiftLinear):
    """The layer's CSR patterns of S and S^T, cached per selection as SiftLinear.increment_product caches them."""
    return layer._kernel_state("csr", lambda: kernels.increment_patterns(layer.indices, layer.out_features,
                                                                       layer.in_features))


def _fused_csr(tensor: torch.Tensor) -> bool:
    """Whether ``dense + dense @ csr`` runs as one torch op here (CPU, fp32/fp64)."""
    return tensor.device.type == "cpu" and tensor.dtype in (torch.float32, torch.float64)


def _csr_tensor(pattern, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The sparse matrix of a CSR pattern holding ``values`` (permuted into the pattern's order where needed)."""
    vals = values.detach() if pattern.perm is None else values.detach()[pattern.perm]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(pattern.crow, pattern.col, vals.to(dtype), (pattern.rows, pattern.cols),
                                       check_invariants=False)


class _AddIncrement(torch.autograd.Function):
    """out + x @ S^T, for ``out`` the 4-bit product of ``x``; differentiable in out, x and values.

    ``probe`` is the calibrating Selector's grad-requiring scalar (see ``_SparseIncrementLinear``): with every
    parameter frozen it still makes autograd run this backward, which then hands the selector grad_out and x.
    """

    @staticmethod
    def forward(ctx, out, x, values, indices, probe, layer):
        ctx.layer = layer
        ctx.observer = layer._observer
        ctx.save_for_backward(x, values, indices)
        # While calibrating the values are still zero: the 4-bit product is the whole output (a copy, since
        # bitsandbytes returns its product as a view, which a custom Function may not hand on as its own).
        if ctx.observer is not None or not layer.k:
            return out.clone()
        x_2d = x.reshape(-1, x.shape[-1]).to(out.dtype)
        if layer._increment_on_triton(x_2d):
            result = out.contiguous().clone()
            layer.increment_product(x_2d, values, result.view(-1, out.shape[-1]))
            return result
        out_2d = out.reshape(-1, out.shape[-1])
        if _fused_csr(x_2d):
            # One op, its result already in the output's layout: out + x @ S^T with S^T as a CSR right operand
            # (about 4x faster on CPU than S @ x^T transposed back and added, measured at 0.9% of 1536x576).
            s_t = _csr_tensor(_csr_patterns(layer)[1], values, x_2d.dtype)
            return torch.addmm(out_2d, x_2d, s_t).view(out.shape)
        product = kernels.increment_matmul(x_2d, _csr_patterns(layer), values)
        return torch.add(out_2d, product.to(out.dtype)).view(out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, indices = ctx.saved_tensors
        layer = ctx.layer
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        if ctx.observer is not None:
            weight = dequantized_weight(layer) if ctx.observer.config.metric in WEIGHT_METRICS else None
            ctx.observer.observe(layer, grad_2d, x_2d, weight)
            del weight
            return grad_out, None, None, None, None, None
        grad_x = grad_values = None
        if ctx.needs_input_grad[1] and layer.k:
            # The increment's share, grad_out @ S; autograd adds bitsandbytes' grad_out @ W4 to it.
            if layer._increment_on_triton(grad_2d):
                grad_x = torch.zeros(x_2d.shape, dtype=grad_out.dtype, device=grad_out.device)
                layer.increment_product(grad_2d, values, grad_x, transposed=True)
            else:
                # Contiguous, so that autograd's sum with bitsandbytes' share reads both in order.
                grad_x = kernels.increment_matmul_transposed(grad_2d, _csr_patterns(layer), values).contiguous()
            grad_x = grad_x.reshape(x.shape).to(x.dtype)
        if ctx.needs_input_grad[2]:
            grad_values = values_gradient(layer, grad_2d, x_2d.to(grad_out.dtype), indices).to(values.dtype)
        return grad_out, grad_x, grad_values, None, None, None


class SiftLinear4bit(SiftLinear, Linear4bit):
    """A bitsandbytes ``Linear4bit`` whose frozen 4-bit weight carries a trainable fp32 sparse increment.

    Made by :meth:`SiftLinear.convert <sift_llm.sift.layer.SiftLinear.convert>` from a Linear4bit (the module
    object, its Params4bit weight and quant state are kept); ``values`` and ``indices`` as in SiftLinear.
    The layer options ``merge`` and ``values_grad``: the increment is always a separate product (merge has
    no effect), ``values_grad`` picks the values' gradient path as for any SIFT layer.
    """

    @classmethod
    def _check_convertible(cls, linear: nn.Module, name: str) -> None:
        if not isinstance(linear, Linear4bit) or isinstance(linear, SiftLinear):
            raise UserError(f"{name}: expected a bitsandbytes Linear4bit, got {type(linear).__name__}")
        if getattr(linear.weight, "quant_state", None) is None and getattr(linear, "quant_state", None) is None:
            raise UserError(f"{name}: its 4-bit weight is not quantized yet; load the model with a "
                            "BitsAndBytesConfig (or move it to its device) before attaching SIFT")
        if linear.weight.requires_grad:
            raise UserError(f"{name}: a 4-bit weight cannot train; freeze it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        observer = self._observer
        if observer is None and not self.selected:
            raise RuntimeError(
                f"{self.sift_name}: no sparse selection yet; calibrate and finalize a Selector, "
                "load an adapter, or load a checkpoint first"
            )
        if self.weight.requires_grad:
            raise RuntimeError(f"{self.sift_name}: the base weight of a SIFT layer must stay frozen")
        fix_4bit_weight_quant_state_from_module(self)
        state = self.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            _, state = _canonical(self)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = bnb.matmul_4bit(x, self.weight, quant_state=state, bias=bias)
        if observer is not None or self.k:
            probe = None if observer is None else observer.probe
            out = _AddIncrement.apply(out, x, self.values, self.indices, probe, self)
        return out.to(inp_dtype)

    @property
    def quant_type(self) -> str:
        return self.weight.quant_state.quant_type

    def fold_and_revert(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """Dequantize the weight (or cast it to ``dtype``), add the increment (fp32 sum, cast back) and turn
        the module into a plain nn.Linear holding that dense weight: the merged export of a 4-bit run."""
        with torch.no_grad():
            weight = dequantized_weight(self)
            if dtype is not None:
                weight = weight.to(dtype)
            add_increment_(weight.view(-1), self.indices, self.values)
        for attr in ("values", "indices"):
            delattr(self, attr)
        for attr in _SIFT_ATTRS + _LINEAR4BIT_ATTRS:
            self.__dict__.pop(attr, None)
        del self.weight
        self.__class__ = nn.Linear
        self.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach().to(weight.dtype), requires_grad=False)
        return self

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.quant_type} 4-bit"


def merge_and_dequantize(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain model from a 4-bit one: every SIFT increment folded into its dequantized weight (cast to
    ``dtype`` when given), every other 4-bit Linear dequantized by transformers, the quantization config removed.

    Afterwards ``model.save_pretrained`` writes a standard HF directory that loads without bitsandbytes.
    """
    for module in list(model.modules()):
        if isinstance(module, SiftLinear4bit):
            module.fold_and_revert(dtype)
        elif isinstance(module, SiftLinear):
            module.fold_and_revert()
    quantizer = getattr(model, "hf_quantizer", None)
    if any(isinstance(module, Linear4bit) for module in model.modules()):
        if quantizer is None:
            raise UserError("the model holds 4-bit Linears that transformers did not make; cannot dequantize them")
        model = model.dequantize(dtype=dtype)
    elif quantizer is not None:
        quantizer.remove_quantization_config(model)
    if dtype is not None:
        model.to(dtype)
    return model
