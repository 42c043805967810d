"""The saved increment: ``sift_adapter.safetensors`` (indices, values, dense weights) + ``sift_adapter.json``.

Tensors are stored as safetensors only, so loading never unpickles anything. The JSON records the format
version, the base model's name and fingerprints, the SIFT config and the per-module counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from sift_llm import __version__, runtime, schema
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir, atomic_write_json
from sift_llm.sift.config import SiftConfig
from sift_llm.sift.layer import base_dtype, base_values
from sift_llm.sift.model import (
    SiftHandle,
    attach_sift,
    base_fingerprint,
    base_quantization,
    content_probe_positions,
    find_targets,
)

FORMAT_VERSION = 1  # base_model.content (optional; readers without it ignore it) came later within version 1
TENSORS_FILE = "sift_adapter.safetensors"
META_FILE = "sift_adapter.json"


def save_adapter(
    handle: SiftHandle,
    directory: str | os.PathLike,
    *,
    increments: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    dense_state: Mapping[str, torch.Tensor] | None = None,
    extra: Mapping[str, Any] | None = None,
    replace: bool = False,
    content: Mapping[str, Any] | None = None,
) -> Path:
    """Write the increment to ``directory`` atomically; call it on one rank.

    By default the indices and values come from the handle's layers and the dense modules' weights from
    the model. Under ZeRO-3 (or to store fp32 masters instead of bf16 values) pass already gathered
    tensors: ``increments`` as {module name: (indices, values)} and ``dense_state`` as
    {"<module>.<param>": tensor}. ``extra`` (JSON-ready) is stored in the metadata, e.g. the selection report.
    ``content`` is :meth:`SiftHandle.base_content` (computed here when not given; under ZeRO-3 the caller
    computes it with its gather function on every rank).
    """
    if increments is None:
        increments = handle.increments()
    if dense_state is None:
        dense_state = {key: param.detach() for key, param in handle.dense_parameters().items()}
    _check_names("increments", increments, handle.layers)
    _check_names("dense_state", dense_state, handle.dense_parameters())

    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, (indices, values) in increments.items():
        layer = handle.layers[name]
        if indices.numel() != values.numel():
            raise UserError(f"{name}: {indices.numel()} indices but {values.numel()} values")
        tensors[f"{name}.indices"] = _portable(indices)
        tensors[f"{name}.values"] = _portable(values)
        modules[name] = {"shape": [layer.out_features, layer.in_features], "selected": indices.numel()}
    for key, tensor in dense_state.items():
        tensors[key] = _portable(tensor)
    meta = {
        "format_version": FORMAT_VERSION,
        "library": f"sift_llm {__version__}",
        "base_model": {
            "name": handle.base_name,
            "fingerprint": handle.fingerprint,
            "shape_fingerprint": handle.shape_fingerprint,
            "content": dict(content) if content is not None else handle.base_content(),
            # A 4-bit base (how bitsandbytes quantized it); absent for a full-precision base.
            **({"quantization": dict(handle.quantization)} if handle.quantization else {}),
        },
        "config": schema.to_dict(handle.config),
        "modules": modules,
        "dense": sorted(dense_state),
        "selected": sum(m["selected"] for m in modules.values()),
        "extra": dict(extra or {}),
    }
    with atomic_dir(directory, replace=replace) as tmp:
        save_file(tensors, str(tmp / TENSORS_FILE), metadata={"format": "pt"})
        atomic_write_json(tmp / META_FILE, meta)
    return Path(directory)


def read_adapter_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The adapter's JSON metadata, checked for presence and format version."""
    directory = Path(directory)
    for name in (META_FILE, TENSORS_FILE):
        if not (directory / name).is_file():
            raise UserError(f"{directory} is not a SIFT adapter: {name} is missing")
    meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{directory}: adapter format version {meta.get('format_version')!r} is not supported "
            f"(this sift_llm reads version {FORMAT_VERSION})"
        )
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> SiftHandle:
    """Attach SIFT to a base ``model`` and fill it with a saved increment, for in-memory use.

    Raises a UserError naming both sides when ``model`` is not the base the adapter was trained on
    (different targeted weight names or shapes). A base that differs only in dtype (e.g. loaded in
    bf16 after training in fp32) is accepted; the values are cast to the values' dtype.
    """
    meta = read_adapter_metadata(directory)
    config = schema.build(SiftConfig, meta["config"], "sift")
    tensors = load_file(str(Path(directory) / TENSORS_FILE))
    _check_base(model, config, meta["base_model"], directory,
                {name: tensors[f"{name}.indices"] for name in meta["modules"]})
    handle = attach_sift(model, config, base_name=meta["base_model"]["name"])
    handle.apply_increment({name: (tensors[f"{name}.indices"], tensors[f"{name}.values"]) for name in meta["modules"]})
    dense = handle.dense_parameters()
    _check_names("adapter dense weights", dict.fromkeys(meta["dense"]), dense)
    with torch.no_grad():
        for key in meta["dense"]:
            if tensors[key].shape != dense[key].shape:
                raise UserError(f"{key}: adapter holds shape {tuple(tensors[key].shape)}, model {tuple(dense[key].shape)}")
            dense[key].copy_(tensors[key])
    return handle


def _check_base(model: nn.Module, config: SiftConfig, expected: Mapping[str, Any], directory, indices) -> None:
    """Refuse a base that is not the one the adapter was trained on: other names or shapes of the targeted
    weights, or other values at the selected positions (another fine-tune, or the adapter's own merged model)."""
    targets = find_targets(model, config)
    shape_fingerprint = base_fingerprint(targets.items(), with_dtypes=False)
    here = getattr(model, "name_or_path", "") or "(unnamed model)"
    trained_on = expected["name"] or "(unnamed)"
    if shape_fingerprint != expected["shape_fingerprint"]:
        raise UserError(
            f"the adapter in {directory} was trained on base {trained_on!r} "
            f"(fingerprint {expected['fingerprint'][:16]}, shapes {expected['shape_fingerprint'][:16]}) "
            f"but the model given is {here!r} (fingerprint {base_fingerprint(targets.items())[:16]}, "
            f"shapes {shape_fingerprint[:16]}): its targeted weights differ in names or shapes"
        )
    _check_quantization(model, targets, expected, directory, trained_on)
    content = expected.get("content")
    if content is None:
        runtime.log(f"SIFT adapter {directory}: written before base-content fingerprints; the base's weights are not checked")
    else:
        problem = _content_mismatch(targets, indices, content)
        if problem:
            raise UserError(
                f"the adapter in {directory} was trained on base {trained_on!r}, but the model given ({here!r}) "
                f"holds other weights at the adapter's positions ({problem}): it is another model of the same "
                "architecture, or a merged model that already contains an increment (applying an adapter to its "
                "own merged model adds the increment twice). Load the base the adapter was trained on."
            )
    if base_fingerprint(targets.items()) != expected["fingerprint"]:
        runtime.log(f"SIFT adapter: base {here!r} matches the adapter's base except for the weights' dtype")


def _check_quantization(model: nn.Module, targets: Mapping[str, nn.Module], expected: Mapping[str, Any], directory,
                        trained_on: str) -> None:
    """Refuse a 4-bit adapter on a full-precision base, a full-precision one on a 4-bit base, or another 4-bit
    format: the base values under the increment would differ (by the quantization error) everywhere."""
    recorded = expected.get("quantization")
    here = base_quantization(targets.values())
    if recorded is None and here is None:
        return
    def what(q):
        return f"a 4-bit {q['quant_type']} base" if q else "a full-precision base"

    if recorded is None or here is None or recorded.get("quant_type") != here["quant_type"] or \
            recorded.get("blocksize") != here["blocksize"] or recorded.get("double_quant") != here["double_quant"]:
        fix = (f"load the base with model.quantization={recorded['quant_type']} "
               f"model.double_quant={str(recorded.get('double_quant')).lower()} (sift_llm.loading.load_model does this "
               "from the adapter's record)" if recorded else "load the base without quantization")
        raise UserError(
            f"the adapter in {directory} was trained on {what(recorded)} ({trained_on!r}), but the model given is "
            f"{what(here)}" + (f" ({here})" if here and recorded else "") + f": {fix}"
        )


def _content_mismatch(targets: Mapping[str, nn.Linear], indices: Mapping[str, torch.Tensor], content) -> str | None:
    """None when the targets hold the recorded base values; else what differs.

    In the recorded dtype the sha256 must match exactly; in another dtype (a bf16-trained adapter on an fp32
    base, say) the recorded fp32 probes must agree within the coarser dtype's rounding. 4-bit targets are read
    dequantized, one matrix at a time (:func:`sift_llm.sift.layer.base_values`).
    """
    dtypes = {str(base_dtype(module)) for module in targets.values()}
    if ",".join(sorted(dtypes)) == content["dtype"]:
        digest = hashlib.sha256()
        for name, module in targets.items():
            base = base_values(module, indices[name])
            digest.update(name.encode() + b"\0" + base.cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return None if digest.hexdigest() == content["sha256"] else "the sha256 of the base values differs"
    eps = max(torch.finfo(getattr(torch, d.removeprefix("torch."))).eps for d in [*dtypes, *content["dtype"].split(",")])
    worst, differing, probed = 0.0, 0, 0
    for name, module in targets.items():
        at = indices[name].long()
        recorded = torch.tensor(content["probes"].get(name, []), dtype=torch.float32)
        here = base_values(module, at[content_probe_positions(at.numel())]).float().cpu()
        if here.numel() != recorded.numel():
            return f"{name}: {recorded.numel()} probes recorded, {here.numel()} positions here"
        diff = (here - recorded).abs()
        bad = diff > eps * recorded.abs() + 1e-30
        differing += int(bad.sum())
        probed += recorded.numel()
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return f"{differing} of {probed} probed values differ, by up to {worst:.3g}" if differing else None


def _check_names(what: str, given: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    missing, unknown = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    if missing or unknown:
        raise UserError(f"{what} do not match the SIFT model: missing {missing[:5]}, unknown {unknown[:5]}")


def _portable(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()
