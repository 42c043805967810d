"""Training metrics on rank 0: one JSON object per line in metrics.jsonl, mirrored to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

from sift_llm.runtime import is_rank0

METRICS_NAME = "metrics.jsonl"


class MetricsLog:
    def __init__(self, run_dir: Path, resume_step: int = 0):
        self.enabled = is_rank0()
        self.path = run_dir / METRICS_NAME
        self._tb = None
        if not self.enabled:
            return
        self._truncate_after(resume_step)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so the file reads as one uninterrupted run."""
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip()
                and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
