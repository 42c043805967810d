"""Atomic, resumable checkpoints: DeepSpeed state without frozen weights, plus what DeepSpeed does not keep.

A checkpoint is written under ``checkpoints/.staging-step-N`` and renamed to ``checkpoints/step-N`` only
when every rank has finished; ``checkpoints/latest`` is then rewritten atomically. A save killed midway
leaves a staging directory that nothing reads, and the previous checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sift_llm.errors import UserError
from sift_llm.fsio import atomic_write_json, atomic_write_text
from sift_llm.runtime import is_rank0, rank
from sift_llm.train.batches import DataPosition

DEEPSPEED_TAG = "deepspeed"
META_NAME = "meta.json"


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, method, run_dir: Path, step: int, position: DataPosition, keep_last: int, written=None) -> Path:
    """Write checkpoint ``step`` (every rank calls this); ``written()`` runs once all parts are on disk,
    before the checkpoint is committed (the fault-injection tests die there)."""
    root = checkpoint_root(run_dir)
    name = f"step-{step:07d}"
    final, staging = root / name, root / f".staging-{name}"
    if is_rank0():
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(
        str(staging),
        tag=DEEPSPEED_TAG,
        client_state={"step": step},
        save_latest=False,
        exclude_frozen_parameters=True,
    )
    save_file(_rng_state(), str(staging / f"rng-rank{rank()}.safetensors"))
    if is_rank0():
        method.save_state(engine.module, staging)
    _barrier()
    if written is not None:
        written()
    if is_rank0():
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        meta = {"step": step, "position": dataclasses.asdict(position), "world_size": world, "method": method.name}
        atomic_write_json(staging / META_NAME, meta)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        atomic_write_text(root / "latest", name + "\n")
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    finished = sorted(p for p in root.glob("step-*") if (p / META_NAME).is_file())
    for old in finished[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".staging-*"):
        shutil.rmtree(stale, ignore_errors=True)


def find(run_dir: Path, explicit: str | None) -> Path | None:
    """The checkpoint to resume from: ``explicit`` when given, else the run's latest, else None."""
    if explicit:
        path = Path(explicit)
        if not (path / META_NAME).is_file():
            raise UserError(f"--resume {explicit}: not a complete checkpoint (no {META_NAME})")
        return path
    pointer = checkpoint_root(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoint_root(run_dir) / pointer.read_text().strip()
    if not (path / META_NAME).is_file():
        raise UserError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def read_meta(path: Path) -> dict:
    return json.loads((path / META_NAME).read_text())


def check_compatible(path: Path, method_name: str, world: int) -> dict:
    """The checkpoint's metadata, after checking that this run can continue from it (before anything loads)."""
    meta = read_meta(path)
    if meta["method"] != method_name:
        raise UserError(f"{path} was written by method {meta['method']!r}, this run uses {method_name!r}")
    if meta["world_size"] != world:
        raise UserError(
            f"{path} was written by {meta['world_size']} ranks and this run has {world}: DeepSpeed partitions "
            f"the optimizer state by rank, so resume with {meta['world_size']} processes "
            f"(e.g. --num_gpus {meta['world_size']}), or start a new run"
        )
    return meta


def load(engine, method, path: Path) -> tuple[int, DataPosition]:
    """Restore model, optimizer, scheduler, data position and RNG from ``path``; returns (step, position).

    The method's own state (SIFT's indices) is restored before the engine is built, by the trainer.
    """
    meta = read_meta(path)
    loaded, _ = engine.load_checkpoint(
        str(path),
        tag=DEEPSPEED_TAG,
        load_module_strict=False,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if loaded is None:
        raise UserError(f"DeepSpeed could not load the checkpoint in {path / DEEPSPEED_TAG}")
    rng = load_file(str(path / f"rng-rank{rank()}.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta["step"], DataPosition(**meta["position"])
