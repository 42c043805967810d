"""A SIFT increment as a PEFT ``supertuning`` adapter, which plain ``peft`` loads without sift_llm.

PEFT 0.21's supertuning layer holds, per targeted Linear, a frozen base weight, a persistent int32 buffer
``supertuning_indices`` of flat row-major positions and a 1-D fp32 parameter ``supertuning_values``; its
forward and merge compute ``W.flatten().scatter_add(indices, values.to(W.dtype))``. That is a SIFT
increment, with two differences this module bridges:

- PEFT sizes every matrix from one ``sparsity``: ``int(numel * (1 - sparsity))`` entries, checked against
  the file at load time (a size mismatch is an error). The export picks the largest sparsity whose count
  is at least every matrix's selected count and pads each matrix with zero values at its lowest unselected
  positions (indices stay sorted). Adding zero changes no weight, so the padding is exact; it only costs
  space, and it is reported (``sift_export.json``) and capped (``max_padding``). A per-matrix selection pads
  a few entries per matrix; a global-scope selection, whose per-matrix densities differ widely, would pad
  far more and is refused unless the cap is raised. Matrices with no selected entry are not targeted.
- Dense modules (``dense_modules``, e.g. lm_head) travel as PEFT ``modules_to_save``; a module whose weight
  is tied to a dense one (lm_head and the input embeddings) is saved too, with the same tensor, because
  PEFT copies each saved module on its own while SIFT trained the one shared parameter.

Keys of ``adapter_model.safetensors``: ``base_model.model.<module>.supertuning_indices`` (int32),
``base_model.model.<module>.supertuning_values`` (fp32), ``base_model.model.<module>.<param>`` (dense).
In fp32 PEFT's sum equals SIFT's bit for bit; on a bf16/fp16 base PEFT rounds the value to the weight
dtype before adding (SIFT adds in fp32 and rounds once), a difference of at most one rounding per entry.

The base model is checked before anything is written: the targeted names and shapes (from its config,
on the meta device) and, when the adapter records them, its weights at the selected positions (so the
run's own merged model, which already holds the increment, is refused as a base).

No DeepSpeed and no sift_llm import is needed to use the result:
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), output)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sift_llm import __version__, runtime, schema
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir, atomic_write_json, atomic_write_text
from sift_llm.sift.adapter import META_FILE, TENSORS_FILE, read_adapter_metadata
from sift_llm.sift.config import SiftConfig, matches
from sift_llm.sift.model import base_fingerprint, find_targets

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
EXPORT_META = "sift_export.json"
# PeftModelForCausalLM -> SupertuningModel -> the transformers model: the prefix of every saved key.
KEY_PREFIX = "base_model.model."
# Refuse an export whose zero padding exceeds this share of the exported entries (a flag can raise it).
DEFAULT_MAX_PADDING = 0.10
INT32_LIMIT = 2**31


class PeftPaddingError(UserError):
    """The export would need more zero padding than allowed (typically a global-scope selection)."""


def peft_count(numel: int, sparsity: float) -> int:
    """Entries PEFT's supertuning layer allocates for a matrix of ``numel`` entries (its own formula)."""
    return int(numel * (1 - sparsity))


def choose_sparsity(matrices: list[tuple[int, int]]) -> float:
    """The largest sparsity at which PEFT's count covers every (numel, selected) matrix, selected >= 1.

    PEFT's count shrinks as the sparsity grows, so the largest feasible sparsity gives every matrix its
    smallest covering count at once. In exact arithmetic that is ``1 - max(selected / numel)``; a bisection
    over floats against PEFT's own float formula settles the last ulp.
    """
    if not matrices:
        raise ValueError("no matrix to size")

    def covers(sparsity: float) -> bool:
        return all(peft_count(numel, sparsity) >= selected for numel, selected in matrices)

    low, high = 0.0, 1.0  # sparsity 0 keeps every entry; 1 is outside PEFT's range
    if not covers(low):
        raise ValueError("a matrix selects more entries than it has")
    while (mid := (low + high) / 2) > low and mid < high:
        if covers(mid):
            low = mid
        else:
            high = mid
    # The shortest decimal at or below it that gives the same counts reads better in adapter_config.json.
    counts = [peft_count(numel, low) for numel, _ in matrices]
    for digits in range(1, 18):
        short = math.floor(low * 10**digits) / 10**digits
        if short <= low and [peft_count(numel, short) for numel, _ in matrices] == counts:
            return short
    return low


def pad_selection(indices: torch.Tensor, values: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (indices, values): the selection plus zero values at the lowest unselected positions, sorted.

    ``indices`` must be sorted and unique; the result's indices are int64, its values keep their dtype.
    """
    indices = indices.to(torch.int64)
    pad = count - indices.numel()
    if pad < 0:
        raise ValueError(f"cannot pad {indices.numel()} entries down to {count}")
    if pad == 0:
        return indices, values
    # The lowest `pad` free positions all lie below k + pad.
    candidates = torch.arange(indices.numel() + pad, dtype=torch.int64)
    free = candidates[~torch.isin(candidates, indices)][:pad]
    merged = torch.cat([indices, free])
    order = torch.argsort(merged, stable=True)
    padded_values = torch.cat([values, torch.zeros(pad, dtype=values.dtype)])
    return merged[order], padded_values[order]


@dataclass
class _Source:
    """What an export reads: a SIFT adapter dir, or an adapter PEFT already loads (LoRA runs)."""

    adapter_dir: Path
    kind: str  # "sift" or "peft"
    run_dir: Path | None
    base_model: Path | None


def export_peft(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    base_model: str | os.PathLike | None = None,
    max_padding: float = DEFAULT_MAX_PADDING,
    replace: bool = False,
) -> Path:
    """Write a PEFT adapter directory that ``peft.PeftModel.from_pretrained(base, output)`` loads; return it.

    ``source`` is a training run directory (``RUN_DIR/adapter`` is read; the base model comes from
    ``train_summary.json`` or ``config.yaml``) or a SIFT adapter directory (the base named in its metadata).
    ``base_model`` overrides the base model directory; it is recorded as ``base_model_name_or_path``.
    A LoRA run's adapter is already a PEFT adapter: it is copied, with ``base_model_name_or_path`` set.
    The zero padding PEFT's single sparsity needs is refused above ``max_padding`` (a share of the
    exported entries) with :class:`PeftPaddingError`, a UserError. The output appears complete or not at all; an existing one is replaced only with
    ``replace``. Besides the two PEFT files it holds ``sift_export.json`` (counts, padding, provenance).
    """
    if not 0.0 <= max_padding <= 1.0:
        raise UserError(f"max_padding must be a share between 0 and 1, got {max_padding}")
    output = Path(output).expanduser()
    src = _resolve_source(Path(source).expanduser())
    base = _resolve_base(src, base_model)
    inputs = [src.adapter_dir, src.run_dir, base]
    if any(path is not None and output.resolve() == path.resolve() for path in inputs):
        raise UserError(f"output {output} is one of the inputs (run, adapter or base model); choose a new directory")
    if output.exists() and not replace:
        raise UserError(f"{output} already exists; choose another output directory or replace it (--force)")
    if src.kind == "peft":
        return _pass_through(src, base, output, replace)

    meta, config = _read_sift_metadata(src.adapter_dir)
    quantization = meta["base_model"].get("quantization")
    if quantization:
        raise UserError(
            f"{src.adapter_dir} was trained on a 4-bit {quantization.get('quant_type')} base: a PEFT adapter would be "
            "applied to the full-precision base, whose weights differ from the 4-bit ones everywhere; evaluate the "
            "adapter in memory (sift-llm eval loads the 4-bit base) or export the run's merged model "
            "(train.save_merged: the dequantized base plus the increments)"
        )
    skeleton = _skeleton(base)
    _check_base(skeleton, config, meta, src.adapter_dir, base)
    tensors = _read_tensors(src.adapter_dir)
    shapes = {name: _module_shape(name, entry, src.adapter_dir) for name, entry in meta["modules"].items()}
    increments = {name: _checked_increment(tensors, name, shapes[name], src.adapter_dir) for name in shapes}
    _check_base_content(base, meta, increments, src.adapter_dir)

    targeted = {name: inc for name, inc in increments.items() if inc[0].numel() > 0}
    if not targeted:
        raise UserError(f"{src.adapter_dir}: the adapter selects no entry in any matrix; nothing to export")
    numel = {name: shapes[name][0] * shapes[name][1] for name in shapes}
    sparsity = choose_sparsity([(numel[name], inc[0].numel()) for name, inc in targeted.items()])
    counts = {name: peft_count(numel[name], sparsity) for name in targeted}
    selected = sum(inc[0].numel() for inc in targeted.values())
    exported = sum(counts.values())
    padded = exported - selected
    share = padded / exported
    if share > max_padding:
        densities = [inc[0].numel() / numel[name] for name, inc in targeted.items()]
        left_out = len(increments) - len(targeted)
        empty = f"; {left_out} matrices without any entry are left out" if left_out else ""
        raise PeftPaddingError(
            f"{src.adapter_dir}: PEFT's supertuning format sizes every matrix from one sparsity, and this "
            f"selection's densities range from {min(densities):.4%} to {max(densities):.4%} per matrix "
            f"(scope {config.scope!r}{empty}): the export would hold {exported:,} entries of which {padded:,} "
            f"({share:.1%}) are zero padding, over the limit of {max_padding:.1%}. Raise the limit "
            "(--max-padding), or evaluate the SIFT adapter in memory or the merged model instead"
        )

    weights: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    for name, (indices, values) in targeted.items():
        if numel[name] > INT32_LIMIT:
            raise UserError(f"{name}: {numel[name]:,} entries do not fit PEFT's int32 supertuning indices")
        idx, val = pad_selection(indices, values.float(), counts[name])
        weights[f"{KEY_PREFIX}{name}.supertuning_indices"] = idx.to(torch.int32).contiguous()
        weights[f"{KEY_PREFIX}{name}.supertuning_values"] = val.contiguous()
        modules[name] = {"shape": list(shapes[name]), "selected": indices.numel(), "exported": counts[name],
                         "padded": counts[name] - indices.numel()}
    dense_modules, dense_weights, tied = _dense(skeleton, config, meta, tensors, src.adapter_dir)
    weights.update({KEY_PREFIX + key: tensor.contiguous() for key, tensor in dense_weights.items()})
    _check_peft_matching(skeleton, list(targeted), dense_modules)

    from peft import SupertuningConfig
    from peft import __version__ as peft_version

    peft_config = SupertuningConfig(
        target_modules=list(targeted),
        modules_to_save=dense_modules or None,
        sparsity=sparsity,
        select_top=True,
        init_weights=True,
        save_precomputed_indices=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(base),
        inference_mode=True,
    )
    report = {
        "format": "peft",
        "peft_type": "SUPERTUNING",
        "peft_version": peft_version,
        "library": f"sift_llm {__version__}",
        "source": {"adapter": str(src.adapter_dir.resolve()), "kind": "sift",
                   "run_dir": str(src.run_dir.resolve()) if src.run_dir else None},
        "base_model": str(base),
        "scope": config.scope,
        "sparsity": sparsity,
        "selected": selected,
        "exported": exported,
        "padded": padded,
        "padded_share": share,
        "max_padding": max_padding,
        "values_dtype": "float32",
        "targeted": len(targeted),
        "untargeted_empty": sorted(set(increments) - set(targeted)),
        "modules_to_save": dense_modules,
        "tied": tied,
        "modules": modules,
    }
    with atomic_dir(output, replace=replace) as tmp:
        save_file(weights, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        config_text = json.dumps(_config_dict(peft_config), indent=2, sort_keys=True) + "\n"
        atomic_write_text(tmp / PEFT_CONFIG_FILE, config_text)
        atomic_write_json(tmp / EXPORT_META, report)
    return output


def _config_dict(peft_config) -> dict[str, Any]:
    """What ``PeftConfig.save_pretrained`` writes, with sets as sorted lists (a stable file)."""
    return {key: sorted(value) if isinstance(value, set) else value for key, value in peft_config.to_dict().items()}


def read_export_report(directory: str | os.PathLike) -> dict[str, Any]:
    """The ``sift_export.json`` of an exported directory."""
    path = Path(directory) / EXPORT_META
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {directory} was not written by sift-llm export") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None


# ------------------------------------------------------------------------------------------- sources


def _resolve_source(path: Path) -> _Source:
    if not path.exists():
        raise UserError(f"{path} does not exist: expected a training run directory or a SIFT adapter directory")
    if not path.is_dir():
        raise UserError(f"{path} is not a directory: expected a training run directory or a SIFT adapter directory")
    kind = _adapter_kind(path)
    if kind is not None:
        return _Source(path, kind, None, None)
    if not ((path / "config.yaml").is_file() or (path / "adapter").is_dir()):
        raise UserError(
            f"{path} is neither a training run directory (config.yaml, adapter/) nor an adapter directory "
            f"({META_FILE} or {PEFT_CONFIG_FILE})"
        )
    method, config_base = None, None
    if (path / "config.yaml").is_file():
        from sift_llm import assets
        from sift_llm.config import load_config

        cfg = load_config(path / "config.yaml")
        method = cfg.method.name
        config_base = cfg.model.path
        if method == "full":
            merged = path / "merged"
            raise UserError(f"{path} is a full fine-tuning run: it has no adapter to export; {merged} is already "
                            "a model directory that plain transformers loads")
    adapter = path / "adapter"
    kind = _adapter_kind(adapter) if adapter.is_dir() else None
    if kind is None:
        raise UserError(f"{path} holds no trained adapter: expected {adapter}/ with {META_FILE} (SIFT) or "
                        f"{PEFT_CONFIG_FILE} (LoRA); has the run finished training?")
    base = None
    summary = path / "train_summary.json"
    if summary.is_file():
        try:
            recorded = json.loads(summary.read_text(encoding="utf-8")).get("base_model")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{summary}: not a JSON object as sift-llm train writes it") from None
        if recorded:
            base = Path(recorded)
    if base is None and config_base is not None:
        base = assets.resolve(config_base)
    return _Source(adapter, kind, path, base)


def _adapter_kind(path: Path) -> str | None:
    if (path / META_FILE).is_file() or (path / TENSORS_FILE).is_file():
        return "sift"
    if (path / PEFT_CONFIG_FILE).is_file():
        return "peft"
    return None


def _resolve_base(src: _Source, given: str | os.PathLike | None) -> Path:
    if given is not None:
        base, origin = Path(given).expanduser(), "--base"
    elif src.base_model is not None:
        base, origin = src.base_model, f"the run {src.run_dir}"
    elif src.kind == "sift":
        name = _read_sift_metadata(src.adapter_dir)[0]["base_model"].get("name") or ""
        if not name:
            raise UserError(f"{src.adapter_dir / META_FILE} names no base model: give its directory (--base)")
        base, origin = Path(name).expanduser(), f"{src.adapter_dir / META_FILE}"
    else:
        name = _read_peft_config(src.adapter_dir).get("base_model_name_or_path") or ""
        if not name:
            raise UserError(f"{src.adapter_dir / PEFT_CONFIG_FILE} names no base model: give it (--base)")
        base, origin = Path(name).expanduser(), f"{src.adapter_dir / PEFT_CONFIG_FILE}"
    if not (base / "config.json").is_file():
        raise UserError(f"base model {base} (from {origin}) is not a model directory (no config.json); "
                        "give the base model directory with --base")
    return base.resolve()


def _read_sift_metadata(directory: Path) -> tuple[dict[str, Any], SiftConfig]:
    try:
        meta = read_adapter_metadata(directory)
    except json.JSONDecodeError as err:
        raise UserError(f"{directory / META_FILE}: not valid JSON ({err.msg})") from None
    where = directory / META_FILE
    expected = {"modules": dict, "config": dict, "dense": list, "base_model": dict}
    for key, kind in expected.items():
        if not isinstance(meta.get(key), kind):
            raise UserError(f"{where}: key {key!r} must be a JSON {'object' if kind is dict else 'list'}")
    for key in ("shape_fingerprint",):
        if not isinstance(meta["base_model"].get(key), str):
            raise UserError(f"{where}: base_model.{key} is missing")
    try:
        config = schema.build(SiftConfig, meta["config"], "sift")
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return meta, config


def _read_peft_config(directory: Path) -> dict[str, Any]:
    path = directory / PEFT_CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{path}: not a PEFT adapter config (a JSON object with peft_type expected)")
    return config


def _pass_through(src: _Source, base: Path, output: Path, replace: bool) -> Path:
    """Copy an adapter PEFT already loads (a LoRA run's), recording the base model."""
    config = _read_peft_config(src.adapter_dir)
    weights = src.adapter_dir / PEFT_WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{src.adapter_dir} has {PEFT_CONFIG_FILE} but no {PEFT_WEIGHTS_FILE}")
    config["base_model_name_or_path"] = str(base)
    report = {"format": "peft", "peft_type": config["peft_type"], "library": f"sift_llm {__version__}",
              "source": {"adapter": str(src.adapter_dir.resolve()), "kind": "peft",
                         "run_dir": str(src.run_dir.resolve()) if src.run_dir else None},
              "base_model": str(base), "pass_through": True, "padded": 0, "padded_share": 0.0}
    with atomic_dir(output, replace=replace) as tmp:
        shutil.copy2(weights, tmp / PEFT_WEIGHTS_FILE)
        atomic_write_json(tmp / PEFT_CONFIG_FILE, config)
        atomic_write_json(tmp / EXPORT_META, report)
    return output


# ------------------------------------------------------------------------------------------ checking


def _skeleton(base: Path) -> torch.nn.Module:
    """The base architecture on the meta device: names, shapes and weight ties, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(base))
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"base model {base}: transformers cannot build it as a causal LM ({err})") from None


def _check_base(skeleton, config: SiftConfig, meta: Mapping[str, Any], adapter_dir: Path, base: Path) -> None:
    targets = find_targets(skeleton, config)
    if base_fingerprint(targets.items(), with_dtypes=False) != meta["base_model"]["shape_fingerprint"]:
        missing = sorted(set(meta["modules"]) - set(targets))
        unknown = sorted(set(targets) - set(meta["modules"]))
        raise UserError(
            f"the adapter in {adapter_dir} was trained on base {meta['base_model'].get('name') or '(unnamed)'!r}, "
            f"whose targeted weights differ in names or shapes from {base}'s (adapter only: {missing[:3]}, "
            f"base only: {unknown[:3]}); give the right base model (--base)"
        )


def _check_base_content(base: Path, meta: Mapping[str, Any], increments, adapter_dir: Path) -> None:
    """Refuse a base whose weights at the selected positions are not the ones the adapter recorded (another
    fine-tune of the same architecture, or the run's own merged model, which would add the increment twice).

    Reads the base's safetensors one targeted weight at a time and keeps only the selected entries.
    """
    from sift_llm.sift.adapter import _content_mismatch

    content = meta["base_model"].get("content")
    if content is None:
        runtime.log(f"export: {adapter_dir} predates base-content fingerprints; the base's weights are not checked")
        return
    selected = _selected_base_values(base, {name: indices for name, (indices, _) in increments.items()})
    if selected is None:
        runtime.log(f"export: {base} has no safetensors weights under the module names; its weights are not checked")
        return
    # The check reads each target's weight at its indices: hand it the selected values at positions 0..k-1.
    targets = {name: SimpleNamespace(weight=values) for name, values in selected.items()}
    positions = {name: torch.arange(values.numel()) for name, values in selected.items()}
    problem = _content_mismatch(targets, positions, content)
    if problem:
        raise UserError(
            f"the adapter in {adapter_dir} was trained on base {meta['base_model'].get('name') or '(unnamed)'!r}, "
            f"but {base} holds other weights at the adapter's positions ({problem}): another model of the same "
            "architecture, or a merged model that already contains the increment; give the base model (--base)"
        )


def _selected_base_values(base: Path, indices: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """{module: base weight values at its indices}, from the base's (possibly sharded) safetensors."""
    from safetensors import safe_open

    index = base / "model.safetensors.index.json"
    try:
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        elif (base / "model.safetensors").is_file():
            weight_map = None
        else:
            return None
        files = {name: base / (weight_map[f"{name}.weight"] if weight_map else "model.safetensors") for name in indices}
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    out = {}
    for file in sorted(set(files.values())):
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = set(handle.keys())
                for name in (n for n, f in files.items() if f == file):
                    if f"{name}.weight" not in keys:
                        return None
                    weight = handle.get_tensor(f"{name}.weight")
                    out[name] = weight.reshape(-1).index_select(0, indices[name].long())
                    del weight
        except (SafetensorError, OSError) as err:
            raise UserError(f"base model {base}: cannot read {file.name} ({err})") from None
    return {name: out[name] for name in indices}


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TENSORS_FILE
    if not path.is_file():
        raise UserError(f"{directory} is not a SIFT adapter: {TENSORS_FILE} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None


def _module_shape(name: str, entry: Any, directory: Path) -> tuple[int, int]:
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise UserError(f"{directory / META_FILE}: modules.{name}.shape must be [out_features, in_features]")
    return shape[0], shape[1]


def _checked_increment(tensors: Mapping[str, torch.Tensor], name: str, shape: tuple[int, int],
                       directory: Path) -> tuple[torch.Tensor, torch.Tensor]:
    where = directory / TENSORS_FILE
    for suffix in ("indices", "values"):
        if f"{name}.{suffix}" not in tensors:
            raise UserError(f"{where}: tensor {name}.{suffix} is missing")
    indices, values = tensors[f"{name}.indices"], tensors[f"{name}.values"]
    numel = shape[0] * shape[1]
    if indices.ndim != 1 or indices.dtype not in (torch.int32, torch.int64):
        raise UserError(f"{where}: {name}.indices must be a 1-D int32/int64 tensor, got {indices.dtype} "
                        f"{tuple(indices.shape)}")
    if values.ndim != 1 or not values.dtype.is_floating_point or values.numel() != indices.numel():
        raise UserError(f"{where}: {name}.values must be a 1-D float tensor of {indices.numel()} entries, "
                        f"got {values.dtype} {tuple(values.shape)}")
    if indices.numel():
        wide = indices.to(torch.int64)
        if int(wide[0]) < 0 or int(wide[-1]) >= numel or not bool((wide[1:] > wide[:-1]).all()):
            raise UserError(f"{where}: {name}.indices must be sorted, unique flat positions in [0, {numel}) "
                            f"of its {shape[0]}x{shape[1]} weight")
        if not bool(torch.isfinite(values).all()):
            raise UserError(f"{where}: {name}.values holds NaN or infinite entries")
    return indices, values


def _dense(skeleton, config: SiftConfig, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
           directory: Path) -> tuple[list[str], dict[str, torch.Tensor], dict[str, str]]:
    """(modules_to_save, {key: tensor}, {tied key: dense key}): the dense modules and their weight ties."""
    named = dict(skeleton.named_modules())
    found = [name for name in named if name and matches(name, config.dense_modules)]
    outermost = [name for name in found if not any(name.startswith(other + ".") for other in found)]
    keys = {f"{module}.{param}" for module in outermost for param, _ in named[module].named_parameters()}
    if keys != set(meta["dense"]):
        raise UserError(
            f"{directory / META_FILE}: dense weights {sorted(meta['dense'])[:4]} do not match the base's "
            f"dense_modules {config.dense_modules} ({sorted(keys)[:4]})"
        )
    weights = {}
    for key in sorted(keys):
        if key not in tensors:
            raise UserError(f"{directory / TENSORS_FILE}: dense tensor {key} is missing")
        expected = tuple(skeleton.get_parameter(key).shape)
        if tuple(tensors[key].shape) != expected:
            raise UserError(f"{directory / TENSORS_FILE}: {key} has shape {tuple(tensors[key].shape)}, "
                            f"the base {expected}")
        weights[key] = tensors[key]
    # A weight shared with a module outside the dense ones (tied embeddings) changed there too in training.
    aliases: dict[int, list[str]] = {}
    for key, param in skeleton.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(key)
    tied: dict[str, str] = {}
    for group in aliases.values():
        trained = [key for key in group if key in keys]
        for key in group:
            if trained and key not in keys:
                tied[key] = trained[0]
    modules = list(outermost)
    for key, source in sorted(tied.items()):
        module = key.rsplit(".", 1)[0]
        own = {f"{module}.{param}" for param, _ in named[module].named_parameters(remove_duplicate=False)}
        if not own <= set(tied):
            raise UserError(f"{module} shares {key} with the dense {source} but also holds untrained parameters "
                            f"({sorted(own - set(tied))[:3]}); PEFT's modules_to_save cannot express that")
        if module in find_targets(skeleton, config):
            raise UserError(f"{module} is a sparse target whose weight is tied to the dense {source}; PEFT "
                            "cannot train one copy densely and patch the other sparsely")
        if module not in modules:
            modules.append(module)
        weights[key] = weights[source].clone()
    return modules, weights, tied


def _check_peft_matching(skeleton, targets: list[str], modules_to_save: list[str]) -> None:
    """PEFT matches target names as suffixes ('.' + name) and modules_to_save as plain suffixes: make sure
    the exact names given select exactly these modules."""
    names = [name for name, _ in skeleton.named_modules(remove_duplicate=False) if name]
    wanted = set(targets)
    extra = [n for n in names if n not in wanted and any(n.endswith("." + t) for t in targets)]
    extra += [n for n in names if n not in modules_to_save and any(n.endswith(m) for m in modules_to_save)]
    if extra:
        raise UserError(f"PEFT would also adapt {extra[:3]}, whose names end in a targeted or dense module's name; "
                        "this model's module names cannot be expressed exactly in adapter_config.json")
