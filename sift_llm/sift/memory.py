"""How many bytes the trainable state of a SIFT run takes, per matrix and per selected entry."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from sift_llm.sift.model import SiftHandle

# State tensors per trained entry kept by each optimizer (Adam: first and second moment).
OPTIMIZER_SLOTS = {"adamw": 2, "adam": 2, "sgd": 0}


@dataclass
class StateRow:
    """Trainable state of one sparse matrix or one dense parameter, in bytes."""

    name: str
    kind: Literal["sparse", "dense"]
    entries: int
    values_bytes: int
    master_bytes: int
    optimizer_bytes: int
    index_bytes: int
    gradient_bytes: int  # transient (backward to optimizer step), so not part of state_bytes

    @property
    def state_bytes(self) -> int:
        return self.values_bytes + self.master_bytes + self.optimizer_bytes + self.index_bytes

    @property
    def bytes_per_entry(self) -> float:
        return self.state_bytes / self.entries if self.entries else 0.0


@dataclass
class StateReport:
    """Per-row trainable state plus totals; ``sparse`` and ``dense`` totals are kept apart."""

    optimizer: str
    master_dtype: str | None
    rows: list[StateRow]

    def total(self, kind: Literal["sparse", "dense"] | None = None) -> StateRow:
        rows = [row for row in self.rows if kind is None or row.kind == kind]
        sums = {
            key: sum(getattr(row, key) for row in rows)
            for key in ("entries", "values_bytes", "master_bytes", "optimizer_bytes", "index_bytes", "gradient_bytes")
        }
        return StateRow(name="total" if kind is None else f"total {kind}", kind=kind or "sparse", **sums)

    def to_dict(self) -> dict[str, Any]:
        def row_dict(row: StateRow) -> dict[str, Any]:
            return {**asdict(row), "state_bytes": row.state_bytes, "bytes_per_entry": row.bytes_per_entry}

        return {
            "optimizer": self.optimizer,
            "master_dtype": self.master_dtype,
            "rows": [row_dict(row) for row in self.rows],
            "sparse": row_dict(self.total("sparse")),
            "dense": row_dict(self.total("dense")),
            "total": row_dict(self.total()),
        }

    def summary(self) -> str:
        sparse = self.total("sparse")
        return (
            f"SIFT trainable state ({self.optimizer}, master {self.master_dtype}): {sparse.entries:,} sparse entries, "
            f"{sparse.state_bytes / 2**20:.2f} MiB = {sparse.bytes_per_entry:.1f} B/entry "
            f"({sparse.index_bytes // max(sparse.entries, 1)} of them index); "
            f"dense {self.total('dense').state_bytes / 2**20:.2f} MiB"
        )


def trainable_state_report(
    handle: SiftHandle,
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw",
    master_dtype: torch.dtype | None = torch.float32,
) -> StateReport:
    """Bytes of values, master copy, optimizer state and indices for every trained matrix and parameter.

    Per selected entry the persistent state is:

    - values: the parameter in its current dtype (4 B fp32 in plain PyTorch; 2 B once DeepSpeed bf16 cast it);
    - master: a separate ``master_dtype`` copy, counted only when it differs from the values' dtype
      (DeepSpeed bf16/fp16 keeps an fp32 master: 4 B; plain fp32 training updates the values themselves: 0 B);
      ``master_dtype=None`` means no master at all;
    - optimizer: Adam's m and v in the dtype the optimizer updates (the master's, else the values'): 2 x 4 B;
    - index: 4 B (int32), or 8 B for matrices with 2^31 entries or more.

    So plain fp32 + AdamW holds 4 + 8 = 12 B plus the index (16 B), and DeepSpeed bf16 + AdamW holds
    2 + 4 + 8 = 14 B plus the index (18 B): at most 16 B + index bytes per entry. The values' gradient
    (one values-dtype element per entry; DeepSpeed adds its fp32 partition) lives only from backward to
    the optimizer step and is reported apart as ``gradient_bytes``. Counts come from the layers' indices,
    so the report is right under ZeRO-3 too, where each rank holds a shard of the values.
    """
    slots = OPTIMIZER_SLOTS[optimizer]
    rows = []

    def row(name: str, kind: str, entries: int, dtype: torch.dtype, index_size: int) -> StateRow:
        has_master = master_dtype is not None and master_dtype != dtype
        optimized_size = master_dtype.itemsize if has_master else dtype.itemsize
        return StateRow(
            name=name,
            kind=kind,
            entries=entries,
            values_bytes=entries * dtype.itemsize,
            master_bytes=entries * master_dtype.itemsize if has_master else 0,
            optimizer_bytes=entries * slots * optimized_size,
            index_bytes=entries * index_size,
            gradient_bytes=entries * dtype.itemsize,
        )

    for name, layer in handle.layers.items():
        rows.append(row(name, "sparse", layer.k, layer.values.dtype, layer.indices.element_size()))
    for name, param in handle.dense_parameters().items():
        # ZeRO-3 leaves a shard in the tensor and records the full size as ds_numel.
        rows.append(row(name, "dense", getattr(param, "ds_numel", param.numel()), param.dtype, 0))
    return StateReport(optimizer=optimizer, master_dtype=None if master_dtype is None else str(master_dtype), rows=rows)
