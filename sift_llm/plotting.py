"""Matplotlib for files, not screens: the Agg backend and atomic PNG writes, shared by every chart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sift_llm.fsio import atomic_path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display is needed or used)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return path
