"""Fingerprints for cached base-model results.

A base model's scores depend on its files, the tasks (their definitions and data), the few-shot count,
the limit, the dtype and device kind, and the code that ran them. The fingerprint hashes all of these;
a cached result is reused only under an identical fingerprint. File contents are hashed with sha256;
the digests are memoised by (path, size, mtime) so a 13 GB checkpoint is read once, not on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from sift_llm.evaluation import mmlu
from sift_llm.evaluation.config import EvalConfig, eval_cache_dir
from sift_llm.evaluation.heldout import HeldOutSource
from sift_llm.evaluation.heldout import task_dir as heldout_task_dir
from sift_llm.fsio import atomic_write_json, file_sha256
from sift_llm.loading import dtype_name, resolve_device, resolve_dtype


class DigestMemo:
    """sha256 of files, remembered in a JSON file keyed by absolute path and checked by size + mtime."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.table: dict[str, list] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            self.table = {}
        self.dirty = False

    def digest(self, file: Path) -> str:
        stat = file.stat()
        key = str(file.resolve())
        entry = self.table.get(key)
        if isinstance(entry, list) and entry[:2] == [stat.st_size, stat.st_mtime_ns]:
            return entry[2]
        value = file_sha256(file)
        self.table[key] = [stat.st_size, stat.st_mtime_ns, value]
        self.dirty = True
        return value

    def save(self) -> None:
        if self.dirty:
            atomic_write_json(self.path, self.table)
            self.dirty = False


def _files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted, skipping hidden entries and __pycache__."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def tree_identity(root: Path, memo: DigestMemo) -> list[list]:
    """[relative path, size, sha256] for every file under ``root``."""
    return [[f.relative_to(root).as_posix(), f.stat().st_size, memo.digest(f)] for f in _files(root)]


def base_results_key(model_dir: str | os.PathLike, cfg: EvalConfig,
                     heldout: HeldOutSource | None = None) -> tuple[str, dict[str, Any]]:
    """(short key, the parts it hashes) for base-model results under ``cfg`` (and the held-out tasks on
    ``heldout``'s dataset, identified by the data stage's fingerprint)."""
    import lm_eval

    from sift_llm.evaluation.harness import EVAL_CODE_VERSION
    from sift_llm.evaluation.tasks import include_dirs

    model_dir = Path(model_dir)
    memo = DigestMemo(eval_cache_dir(cfg) / "file_digests.json")
    device = resolve_device(cfg.device)
    parts: dict[str, Any] = {
        "model_files": tree_identity(model_dir, memo),
        "tasks": list(cfg.tasks),
        "num_fewshot": cfg.num_fewshot,
        "limit": cfg.limit,
        "apply_chat_template": cfg.apply_chat_template,
        "dtype": dtype_name(resolve_dtype(cfg.dtype, device)),
        "device_type": device.type,
        "task_files": [tree_identity(d, memo) for d in include_dirs(cfg)],
        "eval_code_version": EVAL_CODE_VERSION,
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
    }
    if mmlu.uses_offline_mmlu(cfg.tasks):
        data = mmlu.resolve_mmlu_file(cfg.mmlu_file)
        parts["mmlu_data"] = [data.stat().st_size, memo.digest(data)]
    if heldout is not None and heldout.tasks:
        parts["heldout"] = {**heldout.identity(), "task_files": tree_identity(heldout_task_dir(), memo)}
    memo.save()
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:20], parts
