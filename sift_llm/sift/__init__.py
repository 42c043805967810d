"""SIFT, Sparse Increment Fine-Tuning: train only the most salient entries of each targeted weight matrix.

Plain PyTorch (no DeepSpeed import); works inside a DeepSpeed engine at ZeRO stages 0-3. Typical use::

    handle = attach_sift(model, SiftConfig(density=0.05))
    selector = handle.selector()
    with selector.calibrating():
        model(**batch).loss.backward()
    report = selector.finalize()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=2e-4)
    ...train...
    save_adapter(handle, "out/adapter")
"""

from sift_llm.sift.adapter import load_adapter, read_adapter_metadata, save_adapter
from sift_llm.sift.config import SiftConfig
from sift_llm.sift.layer import SiftLinear
from sift_llm.sift.memory import StateReport, trainable_state_report
from sift_llm.sift.model import SiftHandle, attach_sift, merge_into_base
from sift_llm.sift.selection import SelectionReport, Selector

__all__ = [
    "SelectionReport",
    "Selector",
    "SiftConfig",
    "SiftHandle",
    "SiftLinear",
    "StateReport",
    "attach_sift",
    "load_adapter",
    "merge_into_base",
    "read_adapter_metadata",
    "save_adapter",
    "trainable_state_report",
]
