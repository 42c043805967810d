"""Training metrics on rank 0: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError
from sift_llm.fsio import read_jsonl_objects

from sift_llm.runtime import is_rank0

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, resumed_at: int | None = None):
        """A fresh run (``resumed_at`` None) starts an empty log; a resumed one keeps lines up to its step."""
        self.enabled = is_rank0()
        self.path = run_dir / METRICS_NAME
        self._tb = None
        if not self.enabled:
            return
        self._truncate_after(resumed_at)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=None if resumed_at is None else resumed_at + 1)

    def _truncate_after(self, step: int | None) -> None:
        """Drop lines logged after the checkpoint, so a resumed run's file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [] if step is None else [record for record in read_metrics(self.path) if record.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a training run's metrics.jsonl; a malformed line raises UserError naming file:line.

    A line with ``loss`` or ``eval_loss`` needs an integer ``step``; other keys are free (lines without any
    of the three, e.g. events, are kept and ignored by the charts).
    """
    records = []
    for where, record in read_jsonl_objects(path):
        step = record.get("step")
        has_loss = "loss" in record or "eval_loss" in record
        if (has_loss or "step" in record) and (isinstance(step, bool) or not isinstance(step, int)):
            raise UserError(f"{where}: 'step' must be an integer, got {step!r}")
        for key in ("loss", "eval_loss"):
            if key in record and (isinstance(record[key], bool) or not isinstance(record[key], (int, float))):
                raise UserError(f"{where}: {key!r} must be a number, got {record[key]!r}")
        records.append(record)
    return records



# --- Measurement hooks for `sift-llm bench`: peak memory and bytes passed to collectives. ---

COUNT_COLLECTIVES_ENV = "SIFT_LLM_COUNT_COLLECTIVES"


def reset_peak_memory(device) -> None:
    """Start a new peak-memory window: this process's peak RSS (Linux VmHWM) and the CUDA allocator's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # then the RSS peak counts from process start
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """Peak resident set size since the last :func:`reset_peak_memory` (bytes), and CUDA max allocated if any."""
    peak = None
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    out = {"rss_peak_bytes": peak}
    if device.type == "cuda":
        import torch

        out["cuda_max_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    return out


# torch.distributed collectives and which argument holds the full (unpartitioned) payload.
_COLLECTIVES = {
    "all_reduce": "tensor", "reduce": "tensor", "broadcast": "tensor", "all_reduce_coalesced": "tensors",
    "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "reduce_scatter": "input_list",
    "all_gather_into_tensor": "output_tensor", "_all_gather_base": "output_tensor", "all_gather": "tensor_list",
    "all_to_all_single": "input",
}


def _payload_bytes(value) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_payload_bytes(item) for item in value)
    return value.numel() * value.element_size() if hasattr(value, "element_size") else 0


class CollectiveCounter:
    """Counts the bytes handed to torch.distributed collectives, per collective, while a step is open.

    Off unless ``SIFT_LLM_COUNT_COLLECTIVES=1``. :meth:`install` must run before DeepSpeed initialises its
    communication backend, which keeps references to some of these functions. The payload counted is the
    full tensor a collective works on (a reduce-scatter's input, an all-gather's output), on each rank.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.active = False
        self.installed = False

    def install(self, force: bool = False) -> None:
        """Wrap the collectives (when ``SIFT_LLM_COUNT_COLLECTIVES=1``, or always with ``force``)."""
        import inspect

        import torch.distributed as dist

        if self.installed or not (force or os.environ.get(COUNT_COLLECTIVES_ENV) == "1"):
            return
        for name, argument in _COLLECTIVES.items():
            original = getattr(dist, name, None)
            if original is None:
                continue
            position = list(inspect.signature(original).parameters).index(argument)
            setattr(dist, name, self._wrap(name, original, argument, position))
        self.installed = True

    def _wrap(self, name: str, original, argument: str, position: int):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.active:
                payload = kwargs[argument] if argument in kwargs else args[position]
                self.counts[name] = self.counts.get(name, 0) + _payload_bytes(payload)
            return original(*args, **kwargs)

        return counted

    def start_step(self) -> None:
        self.counts = {}
        self.active = self.installed

    def end_step(self) -> dict[str, int] | None:
        """The bytes per collective since :meth:`start_step` (None when counting is off)."""
        self.active = False
        return dict(self.counts) if self.installed else None

    @contextlib.contextmanager
    def paused(self):
        """Leave bookkeeping collectives (logging, stop signals) out of the training traffic."""
        active, self.active = self.active, False
        try:
            yield
        finally:
            self.active = active


COLLECTIVES = CollectiveCounter()
