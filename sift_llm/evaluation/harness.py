"""Run lm-eval on a model: in memory (base, base + SIFT/LoRA adapter, merged) or through the lm_eval CLI.

Every path forces the Hugging Face libraries offline; task data comes from local files (the mmlu_offline
tasks) or from what is already in the local datasets cache (lm-eval's own tasks).
"""

from __future__ import annotations

import collections
import contextlib
import difflib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.evaluation import mmlu
from sift_llm.evaluation.config import EvalConfig, eval_cache_dir
from sift_llm.fsio import atomic_write_json
from sift_llm.runtime import is_rank0, log
from sift_llm.schema import to_dict

# Part of every cached-result fingerprint: bump when a change here can change a score.
EVAL_CODE_VERSION = "1"

ADAPTER_FILES = {
    "sift": "sift_adapter.json",
    "peft": "adapter_config.json",
}
# Variables that would make a child lm_eval think it is one rank of a distributed job.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


# ------------------------------------------------------------------------------------------ offline


def force_offline() -> None:
    """Keep transformers, datasets and huggingface_hub off the network, also when already imported."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True


class _QuietCustomDataset(logging.Filter):
    """Drops lm-eval's per-task note about passing kwargs to custom datasets (57 of them for MMLU)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _lm_eval_logging() -> Iterator[None]:
    target = logging.getLogger("lm_eval.api.task")
    quiet = _QuietCustomDataset()
    target.addFilter(quiet)
    try:
        yield
    finally:
        target.removeFilter(quiet)


# ---------------------------------------------------------------------------------- device and dtype


def resolve_device(spec: str):
    import torch

    from sift_llm.runtime import default_device

    if spec == "auto":
        return default_device()
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UserError(f"eval.device: {spec!r} is not a device (try auto, cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"eval.device: {spec!r} asked for, but no CUDA device is available here")
    return device


def resolve_dtype(spec: str, device) -> Any:
    import torch

    if spec == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, spec)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------- model loading


def check_model_dir(path: str | os.PathLike, what: str = "model") -> Path:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise UserError(f"{what} directory {path} does not exist")
    if not (path / "config.json").is_file():
        hint = ""
        if any((path / f).is_file() for f in ADAPTER_FILES.values()):
            hint = " (it holds an adapter: pass it as the adapter and the base model as the model)"
        raise UserError(f"{what} directory {path} has no config.json, so it is not an HF model directory{hint}")
    return path


def detect_adapter(adapter_dir: str | os.PathLike) -> str:
    """'sift' or 'lora'/'peft' from the files in ``adapter_dir``."""
    path = Path(adapter_dir).expanduser()
    if not path.is_dir():
        raise UserError(f"adapter directory {path} does not exist")
    if (path / ADAPTER_FILES["sift"]).is_file():
        return "sift"
    config = path / ADAPTER_FILES["peft"]
    if config.is_file():
        try:
            peft_type = json.loads(config.read_text()).get("peft_type", "")
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{config}: not a valid PEFT adapter config (JSON object expected)") from None
        return "lora" if str(peft_type).upper() == "LORA" else "peft"
    if (path / "config.json").is_file():
        raise UserError(f"{path} is a full model directory, not an adapter: evaluate it as the model")
    raise UserError(
        f"{path} holds neither a SIFT adapter ({ADAPTER_FILES['sift']}) nor a PEFT adapter ({ADAPTER_FILES['peft']})"
    )


def _tokenizer_source(model_dir: Path, adapter_dir: Path | None) -> Path:
    if adapter_dir is not None and (adapter_dir / "tokenizer_config.json").is_file():
        return adapter_dir
    return model_dir


def load_model(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, info): ``model_dir`` loaded on ``device``, with the adapter applied in memory.

    A SIFT adapter is attached by ``sift_llm.sift.load_adapter`` and merged into the weights; a PEFT adapter is loaded with peft and
    merged into the weights. ``info`` records what was loaded (for results.json).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    force_offline()
    model_dir = check_model_dir(model_dir)
    adapter = Path(adapter_dir).expanduser() if adapter_dir is not None else None
    kind = detect_adapter(adapter) if adapter is not None else None
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if dev.type != "cpu":
        kwargs["device_map"] = {"": str(dev)}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    if dev.type == "cpu":
        model.to(dev)
    if kind == "sift":
        from sift_llm.sift import load_adapter, merge_into_base

        # Evaluation needs no gradient, so the increment is folded into the weights here, in memory:
        # plain Linear layers are faster than sparse-increment ones and nothing is written to disk.
        merge_into_base(load_adapter(model, adapter))
    elif kind in ("lora", "peft"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_source(model_dir, adapter))
    info = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter is not None else None,
        "adapter_kind": kind,
        "device": str(dev),
        "dtype": dtype_name(torch_dtype),
    }
    return model, tokenizer, info


# ------------------------------------------------------------------------------------------ tasks


def include_dirs(cfg: EvalConfig) -> list[Path]:
    """The task directories lm-eval indexes: the offline MMLU tasks, then ``cfg.include_paths``."""
    dirs = [mmlu.task_dir()]
    for entry in cfg.include_paths:
        path = Path(entry).expanduser()
        if not path.is_dir():
            raise UserError(f"eval.include_paths: {path} is not a directory")
        dirs.append(path.resolve())
    return dirs


def check_tasks(cfg: EvalConfig) -> None:
    if cfg.num_fewshot > 0 and mmlu.uses_offline_mmlu(cfg.tasks):
        raise UserError(
            "eval.num_fewshot: the offline MMLU has only a test split, so there are no dev questions to draw "
            "shots from; use num_fewshot 0 (the SIFT paper's protocol) or lm-eval's own mmlu task"
        )


def task_metadata(cfg: EvalConfig) -> dict[str, Any]:
    """Task metadata handed to lm-eval: where the offline MMLU data lives (resolved, fetched if needed)."""
    if mmlu.uses_offline_mmlu(cfg.tasks):
        return {"mmlu_file": str(mmlu.resolve_mmlu_file(cfg.mmlu_file))}
    return {}


def build_task_manager(cfg: EvalConfig, metadata: dict[str, Any] | None = None):
    """A TaskManager that knows ``cfg.tasks``; lm-eval's ~10k built-in task files are indexed only when a
    task is not found in the include directories (indexing them costs several seconds)."""
    from lm_eval.tasks import TaskManager

    dirs = [str(d) for d in include_dirs(cfg)]
    metadata = task_metadata(cfg) if metadata is None else metadata
    manager = TaskManager(include_path=dirs, include_defaults=False, metadata=metadata)
    if all(t in manager.all_tasks for t in cfg.tasks):
        return manager
    manager = TaskManager(include_path=dirs, include_defaults=True, metadata=metadata)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks and not _is_pattern_or_file(t)]
    if unknown:
        hints = []
        for name in unknown:
            near = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
        raise UserError(f"eval.tasks: unknown lm-eval task(s) {', '.join(hints)}")
    return manager


def _is_pattern_or_file(name: str) -> bool:
    return any(ch in name for ch in "*?[") or name.endswith((".yaml", ".yml")) or os.sep in name


# ----------------------------------------------------------------------------------------- results


def jsonable(value: Any) -> Any:
    """A JSON-safe copy of lm-eval's output: numpy/torch scalars to numbers, NaN/inf to null, callables
    and other objects to strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return jsonable(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    if callable(value):
        return f"{getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}"
    return str(value)


def clean_results(raw: dict[str, Any], *, keep_samples: bool) -> dict[str, Any]:
    out = dict(raw)
    if not keep_samples:
        out.pop("samples", None)
    return jsonable(out)


def _stamp(results: dict[str, Any], cfg: EvalConfig, info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    import lm_eval

    results["sift_llm"] = {
        **info,
        "eval_config": to_dict(cfg),
        "eval_code_version": EVAL_CODE_VERSION,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "cached": False,
        **extra,
    }
    return results


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """A results.json written by this stage (or by lm-eval), checked for the ``results`` mapping."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"no eval results at {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise UserError(f"{path}: not an lm-eval results file (no 'results' mapping)")
    return data


# ------------------------------------------------------------------------------------------ in memory


def evaluate_loaded(model: Any, tokenizer: Any, cfg: EvalConfig, *, info: dict[str, Any] | None = None) -> dict:
    """lm-eval on an already loaded HF causal LM; returns the JSON-safe results dict."""
    from lm_eval.models.huggingface import HFLM

    force_offline()
    check_tasks(cfg)
    metadata = task_metadata(cfg)
    manager = build_task_manager(cfg, metadata)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
    return _run_simple_evaluate(lm, cfg, manager, info or {}, backend="memory")


def evaluate_lm(lm: Any, cfg: EvalConfig, *, info: dict[str, Any] | None = None) -> dict:
    """lm-eval on any ``lm_eval.api.model.LM`` (e.g. a stub in tests)."""
    force_offline()
    check_tasks(cfg)
    manager = build_task_manager(cfg)
    return _run_simple_evaluate(lm, cfg, manager, info or {}, backend="memory")


def _run_simple_evaluate(lm: Any, cfg: EvalConfig, manager: Any, info: dict[str, Any], *, backend: str) -> dict:
    from lm_eval import simple_evaluate

    start = time.perf_counter()
    with _lm_eval_logging():
        raw = simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            task_manager=manager,
            log_samples=cfg.log_samples,
            apply_chat_template=cfg.apply_chat_template,
        )
    if raw is None:  # lm-eval returns None on non-zero ranks of its own distributed runs
        raise RuntimeError("lm-eval returned no results (called on a non-zero rank?)")
    results = clean_results(raw, keep_samples=cfg.log_samples)
    return _stamp(results, cfg, info, backend=backend, elapsed_s=round(time.perf_counter() - start, 3))


def evaluate_in_memory(model_dir: str | os.PathLike, cfg: EvalConfig, adapter_dir: str | os.PathLike | None = None) -> dict:
    start = time.perf_counter()
    model, tokenizer, info = load_model(model_dir, adapter_dir, device=cfg.device, dtype=cfg.dtype)
    label = f"{info['model']}" + (f" + {info['adapter_kind']} adapter {info['adapter']}" if adapter_dir else "")
    log(f"eval: {label} on {info['device']} ({info['dtype']}), tasks {', '.join(cfg.tasks)}")
    results = evaluate_loaded(model, tokenizer, cfg, info=info)
    results["sift_llm"]["elapsed_s"] = round(time.perf_counter() - start, 3)
    del model
    return results


# ---------------------------------------------------------------------------------------------- CLI


def _merged_include_dir(dirs: list[Path], scratch: Path) -> Path:
    """lm_eval's CLI takes one --include_path: copy several task directories under one root."""
    if len(dirs) == 1:
        return dirs[0]
    root = scratch / "tasks"
    for i, directory in enumerate(dirs):
        shutil.copytree(directory, root / f"{i}_{directory.name}", ignore=shutil.ignore_patterns("__pycache__"))
    return root


def cli_command(model_dir: Path, cfg: EvalConfig, *, adapter_dir: Path | None, device: str, dtype: str,
                include_dir: Path, output_json: Path) -> list[str]:
    """The ``python -m lm_eval run ...`` command line for a model directory."""
    for value, what in ((model_dir, "model"), (adapter_dir, "adapter")):
        if value is not None and "," in str(value):
            raise UserError(f"{what} path {value} contains a comma, which lm_eval's --model_args cannot carry")
    model_args = f"pretrained={model_dir},dtype={dtype}"
    if adapter_dir is not None:
        model_args += f",peft={adapter_dir}"
    cmd = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "hf",
        "--model_args", model_args,
        "--tasks", ",".join(cfg.tasks),
        "--device", device,
        "--batch_size", str(cfg.batch_size),
        "--num_fewshot", str(cfg.num_fewshot),
        "--include_path", str(include_dir),
        "--output_path", str(output_json),
    ]
    if cfg.limit is not None:
        cmd += ["--limit", str(cfg.limit)]
    if cfg.apply_chat_template:
        cmd += ["--apply_chat_template"]
    return cmd


def _child_env(metadata: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if "mmlu_file" in metadata:
        env[mmlu.ENV_FILE] = metadata["mmlu_file"]
    # the task files name sift_llm.evaluation.mmlu, so the child must import this very package
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return env


def evaluate_with_cli(model_dir: str | os.PathLike, cfg: EvalConfig, adapter_dir: str | os.PathLike | None = None) -> dict:
    """Run ``lm_eval`` as a subprocess on a model directory (a PEFT adapter goes in as ``peft=``)."""
    force_offline()
    check_tasks(cfg)
    model_dir = check_model_dir(model_dir).resolve()
    adapter = Path(adapter_dir).expanduser().resolve() if adapter_dir is not None else None
    kind = detect_adapter(adapter) if adapter is not None else None
    if kind == "sift":
        raise UserError(
            f"{adapter} is a SIFT adapter, which the lm_eval CLI cannot load: use eval.backend memory, "
            "or evaluate the run's merged/ directory"
        )
    dev = resolve_device(cfg.device)
    dtype = dtype_name(resolve_dtype(cfg.dtype, dev))
    metadata = task_metadata(cfg)
    if cfg.log_samples:
        log("eval: log_samples is not kept on the lm_eval CLI path; use eval.backend memory for per-question records")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sift-llm-lm-eval-") as scratch_name:
        scratch = Path(scratch_name)
        include = _merged_include_dir(include_dirs(cfg), scratch)
        cmd = cli_command(model_dir, cfg, adapter_dir=adapter, device=str(dev), dtype=dtype,
                          include_dir=include, output_json=scratch / "out" / "results.json")
        log(f"eval: {' '.join(cmd[1:])}")
        tail: collections.deque[str] = collections.deque(maxlen=40)
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_child_env(metadata), cwd=scratch, errors="replace") as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if is_rank0():
                    sys.stderr.write(line)
            returncode = proc.wait()
        if returncode != 0:
            raise UserError(f"lm_eval exited with status {returncode}; its last lines:\n" + "\n".join(tail))
        found = sorted((scratch / "out").glob("results*.json"))
        if not found:
            raise RuntimeError(f"lm_eval finished but wrote no results under {scratch / 'out'}")
        raw = json.loads(found[-1].read_text(encoding="utf-8"))
    info = {"model": str(model_dir), "adapter": str(adapter) if adapter else None, "adapter_kind": kind,
            "device": str(dev), "dtype": dtype}
    results = clean_results(raw, keep_samples=False)
    return _stamp(results, cfg, info, backend="cli", command=cmd,
                  elapsed_s=round(time.perf_counter() - start, 3))


# -------------------------------------------------------------------------------------- entry points


def evaluate_model(
    model_dir: str | os.PathLike,
    cfg: EvalConfig,
    *,
    adapter_dir: str | os.PathLike | None = None,
    output_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate ``model_dir`` (plus an adapter) with ``cfg.backend``; optionally write results.json."""
    if cfg.backend == "cli":
        results = evaluate_with_cli(model_dir, cfg, adapter_dir)
    else:
        results = evaluate_in_memory(model_dir, cfg, adapter_dir)
    if output_path is not None:
        atomic_write_json(output_path, results)
    return results


def evaluate_base(
    model_dir: str | os.PathLike,
    cfg: EvalConfig,
    *,
    output_path: str | os.PathLike | None = None,
) -> dict:
    """Evaluate a base model, reusing cached results under the same fingerprint when ``cfg.cache_base``."""
    from sift_llm.evaluation import cache

    model_dir = check_model_dir(model_dir, "base model")
    if not cfg.cache_base:
        return evaluate_model(model_dir, cfg, output_path=output_path)
    check_tasks(cfg)
    key, parts = cache.base_fingerprint(model_dir, cfg)
    cached_path = eval_cache_dir(cfg) / "base" / key / "results.json"
    results = None
    if cached_path.is_file():
        try:
            results = read_results(cached_path)
        except UserError as err:
            log(f"eval: ignoring unreadable cached base results ({err})")
    if results is not None:
        log(f"eval: base model {model_dir}: reusing cached results {cached_path} (fingerprint {key}); skipped")
        stamp = results.setdefault("sift_llm", {})
        # same fingerprint, same files: report the directory asked for, not where it was first evaluated
        stamp.update(cached=True, cache_path=str(cached_path), model=str(model_dir))
    else:
        log(f"eval: base model {model_dir}: no cached results for fingerprint {key}; evaluating")
        results = evaluate_model(model_dir, cfg)
        results["sift_llm"].update(fingerprint=key, fingerprint_parts=parts)
        atomic_write_json(cached_path, results)
    if output_path is not None:
        atomic_write_json(output_path, results)
    return results
