"""Attaching SIFT to a model, the handle the trainer works through, and folding the increment back in."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from sift_llm import runtime
from sift_llm.errors import UserError
from sift_llm.sift.config import SiftConfig, density_count, matches
from sift_llm.sift.layer import SiftLinear, base_dtype, base_values, is_4bit
from sift_llm.sift.memory import StateReport, trainable_state_report
from sift_llm.sift.selection import Selector


class SiftHandle:
    """A model with SIFT attached: its sparse layers, dense modules and base identity.

    The model itself stays the caller's object (hand it to DeepSpeed or HF as usual); the handle only
    points into it. With ``scope: per_matrix`` the number of values per layer is fixed at attach time, so
    the optimizer and a DeepSpeed engine may be built before selection. With ``scope: global`` the counts
    are known only after :meth:`Selector.finalize`, which must therefore come first.
    """

    def __init__(
        self,
        model: nn.Module,
        config: SiftConfig,
        layers: dict[str, SiftLinear],
        dense_modules: dict[str, nn.Module],
        global_budget: int,
        base_name: str,
    ):
        self.model = model
        self.config = config
        self.layers = layers
        self.dense_modules = dense_modules
        self.global_budget = global_budget
        self.base_name = base_name
        self.fingerprint = base_fingerprint(layers.items())
        self.shape_fingerprint = base_fingerprint(layers.items(), with_dtypes=False)
        self.quantization = base_quantization(layers.values())

    @property
    def selected(self) -> bool:
        """Whether every layer has its final indices (from a selection, an adapter or a checkpoint)."""
        return all(layer.selected for layer in self.layers.values())

    @property
    def sizes_final(self) -> bool:
        """Whether the values' sizes are final, i.e. an optimizer or DeepSpeed engine may be built now."""
        return self.config.scope == "per_matrix" or self.selected

    def selector(self, group: torch.distributed.ProcessGroup | None = None, micro_batches: int = 1) -> Selector:
        """A selector for this model; ``group`` is the data-parallel group (default: the whole world) and
        ``micro_batches`` the micro-batches per rank that make up one scored batch (gradient accumulation)."""
        return Selector(self, group, micro_batches)

    def dense_parameters(self) -> dict[str, nn.Parameter]:
        """Parameters of the dense modules, keyed ``<module>.<param>``."""
        return {
            f"{module_name}.{name}": param
            for module_name, module in self.dense_modules.items()
            for name, param in module.named_parameters()
        }

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name as in ``model.named_parameters()``, parameter) for every value vector and dense parameter."""
        if not self.sizes_final:
            raise UserError("scope 'global': run the selection before building the optimizer (sizes are not known)")
        sparse = [(f"{name}.values", layer.values) for name, layer in self.layers.items() if layer.k > 0]
        return sparse + list(self.dense_parameters().items())

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: every non-empty values vector plus the dense modules' parameters.

        AdamW weight decay on the values shrinks the increment, i.e. pulls the weights toward the base
        model rather than toward zero as in full fine-tuning; use weight_decay=0 to match full fine-tuning.
        """
        return [param for _, param in self.named_trainable_parameters()]

    def increments(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module name: (indices, values)}, detached (under ZeRO-3 gather the values first)."""
        return {name: (layer.indices, layer.values.detach()) for name, layer in self.layers.items()}

    def apply_increment(self, increments: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Set every layer's indices and values, e.g. from a saved adapter; names must match the layers exactly."""
        missing = sorted(set(self.layers) - set(increments))
        unknown = sorted(set(increments) - set(self.layers))
        if missing or unknown:
            raise UserError(
                f"increment does not fit this model's SIFT layers: missing {missing[:5]}, unknown {unknown[:5]}"
            )
        for name, (indices, values) in increments.items():
            if indices.numel() != values.numel():
                raise UserError(f"{name}: {indices.numel()} indices but {values.numel()} values")
            layer = self.layers[name]
            layer.set_selection(indices)
            with torch.no_grad():
                layer.values.copy_(values.reshape(-1).to(device=layer.values.device, dtype=layer.values.dtype))

    def base_content(self, gather=None) -> dict:
        """The identity of the base weights under the increment, in O(selected) work: a sha256 over the base
        values at the selected positions (in the weights' dtype), and a few of them in fp32. On a 4-bit base
        these are the dequantized values (in the dtype the weights dequantize to), one matrix at a time.

        A base that shares names and shapes but not weights (another fine-tune, or this adapter's own merged
        model, whose selected entries already hold the increment) differs here. Under ZeRO-3 pass ``gather``,
        a function of a parameter list returning a context that gathers them (called on every rank).
        """
        digest = hashlib.sha256()
        probes, dtypes = {}, set()
        for name, layer in self.layers.items():
            with gather([layer.weight]) if gather is not None else contextlib.nullcontext():
                base = base_values(layer, layer.indices).cpu()
            digest.update(name.encode() + b"\0" + base.contiguous().view(torch.uint8).numpy().tobytes())
            probes[name] = base[content_probe_positions(base.numel())].float().tolist()
            dtypes.add(str(base_dtype(layer)))
        return {"dtype": ",".join(sorted(dtypes)), "sha256": digest.hexdigest(), "probes": probes}

    def memory_report(self, optimizer: str = "adamw", master_dtype: torch.dtype | None = torch.float32) -> StateReport:
        """Bytes of trainable state; see :func:`sift_llm.sift.memory.trainable_state_report`."""
        return trainable_state_report(self, optimizer=optimizer, master_dtype=master_dtype)


def attach_sift(model: nn.Module, config: SiftConfig, *, base_name: str | None = None) -> SiftHandle:
    """Make the targeted Linears of ``model`` sparse-increment layers, in place, and freeze the rest.

    Every parameter is frozen except the new values and the parameters of ``config.dense_modules``.
    Base weights keep their dtype, device and state-dict keys. ``base_name`` (default: the model's
    ``name_or_path``) is recorded in saved adapters.
    """
    if any(isinstance(module, SiftLinear) for module in model.modules()):
        raise UserError("SIFT is already attached to this model")
    targets = find_targets(model, config)
    if not targets:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        raise UserError(f"no nn.Linear module matches sift targets {config.targets}; {_describe_linears(linears)}")
    for pattern in config.targets:
        if not any(matches(name, [pattern]) for name in targets):
            runtime.log(f"SIFT: target {pattern!r} matches no nn.Linear module")
    dense = _dense_modules(model, config, targets)
    numels = [module.in_features * module.out_features for module in targets.values()]
    total = sum(numels)
    if config.budget is not None and config.budget > total:
        raise UserError(f"sift budget {config.budget:,} exceeds the {total:,} entries of the targeted matrices")
    if config.scope == "global":
        counts = [0] * len(numels)  # fixed by the selection
        global_budget = config.budget or density_count(config.density, total)
    else:
        counts = _per_matrix_counts(numels, config)
        global_budget = sum(counts)

    model.requires_grad_(False)
    values_dtype = getattr(torch, config.values_dtype)
    layers = {
        name: _layer_class(module).convert(module, name, k, values_dtype, values_grad=config.values_grad,
                                           merge=config.merge)
        for (name, module), k in zip(targets.items(), counts, strict=True)
    }
    for module in dense.values():
        module.requires_grad_(True)
    if base_name is None:
        base_name = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    return SiftHandle(model, config, layers, dense, global_budget, str(base_name or ""))


def merge_into_base(model: nn.Module | SiftHandle) -> nn.Module:
    """Fold every increment into its base weight (fp32 sum, cast back) and restore plain ``nn.Linear`` modules.

    Afterwards ``model.save_pretrained`` writes a standard checkpoint that plain transformers loads.
    Dense modules already hold their trained weights. Under ZeRO-3 gather the parameters first. A 4-bit
    layer becomes an nn.Linear with its dequantized weight plus the increment; to turn a whole 4-bit model
    into a plain one use :func:`sift_llm.sift.quantized.merge_and_dequantize`.
    """
    if isinstance(model, SiftHandle):
        model = model.model
    for module in list(model.modules()):
        if isinstance(module, SiftLinear):
            module.fold_and_revert()
    return model


def content_probe_positions(count: int, probes: int = 16) -> torch.Tensor:
    """Evenly spaced positions into a matrix's ``count`` selected entries where base values are recorded."""
    return torch.linspace(0, max(count - 1, 0), min(count, probes)).round().long()


def base_fingerprint(layers, *, with_dtypes: bool = True) -> str:
    """sha256 over the targeted weights' names, shapes (and dtypes): identifies the base architecture.

    A 4-bit weight's dtype reads as ``4bit-<quant type>(<dtype it dequantizes to>)``.
    """
    rows = [
        [name, [layer.out_features, layer.in_features]] + ([_dtype_label(layer)] if with_dtypes else [])
        for name, layer in layers
    ]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _dtype_label(layer: nn.Module) -> str:
    if is_4bit(layer):
        return f"4bit-{layer.weight.quant_state.quant_type}({base_dtype(layer)})"
    return str(layer.weight.dtype)


def base_quantization(modules) -> dict | None:
    """How the 4-bit modules among ``modules`` were quantized (see :func:`sift_llm.sift.quantized.quantization_record`),
    or None for a full-precision base."""
    quantized = [module for module in modules if is_4bit(module)]
    if not quantized:
        return None
    from sift_llm.sift.quantized import quantization_record

    return quantization_record(quantized)


def _layer_class(module: nn.Module) -> type[SiftLinear]:
    """The SIFT layer class for a targeted module: SiftLinear4bit for a bitsandbytes 4-bit Linear."""
    if is_4bit(module):
        from sift_llm.sift.quantized import SiftLinear4bit

        return SiftLinear4bit
    return SiftLinear


def find_targets(model: nn.Module, config: SiftConfig) -> dict[str, nn.Linear]:
    """The Linear modules of ``model`` that ``config.targets`` selects, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and matches(name, config.targets)
    }


def _dense_modules(model: nn.Module, config: SiftConfig, targets: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    dense = {name: m for name, m in model.named_modules() if name and matches(name, config.dense_modules)}
    # Keep only the outermost match: a dense block's children are already covered by it.
    dense = {name: m for name, m in dense.items() if not any(name.startswith(o + ".") for o in dense if o != name)}
    if config.dense_modules and not dense:
        raise UserError(f"sift dense_modules {config.dense_modules} match no module of the model")
    for name in dense:
        overlap = [t for t in targets if t == name or t.startswith(name + ".")]
        if overlap:
            raise UserError(f"module {name!r} is both dense and contains sparse targets ({overlap[0]}, ...)")
    return dense


def _per_matrix_counts(numels: list[int], config: SiftConfig) -> list[int]:
    """Entries per matrix: density of each matrix, or the budget split in proportion to matrix size."""
    if config.budget is None:
        return [density_count(config.density, n) for n in numels]
    total = sum(numels)
    shares = [config.budget * n / total for n in numels]
    counts = [math.floor(s) for s in shares]
    # Largest remainders get the leftover entries, earlier matrices first on ties.
    leftover = config.budget - sum(counts)
    by_remainder = sorted(range(len(numels)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[:leftover]:
        counts[i] += 1
    return counts


def _describe_linears(linears: list[str]) -> str:
    if not linears:
        return "the model has no nn.Linear modules"
    suffixes = Counter(name.rsplit(".", 1)[-1] for name in linears)
    listed = ", ".join(f"{s} (x{c})" if c > 1 else s for s, c in suffixes.items())
    return f"its nn.Linear modules end in: {listed}"
