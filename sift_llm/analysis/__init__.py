"""Gradient sparsity analysis: is the fine-tuning gradient quasi-sparse, and which SIFT density fits?

* :class:`AnalysisConfig` - the analysis options (``sift-llm analyze`` flags).
* :func:`analyze` - measure a config's model (and the same architecture randomly initialised) on its data
  and write analysis.json, summary.md and PNG plots (imported on first use).
* :mod:`sift_llm.analysis.stats` - the per-matrix statistics and their exact definitions.
"""

from __future__ import annotations

from typing import Any

from sift_llm.analysis.config import AnalysisConfig

__all__ = ["AnalysisConfig", "analyze"]


def __getattr__(name: str) -> Any:
    if name == "analyze":
        from sift_llm.analysis.pipeline import analyze

        return analyze
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
