"""The ``analysis:`` section: how many batches are measured, which top shares, which share of the norm to keep."""

from __future__ import annotations

from dataclasses import dataclass

from sift_llm.schema import ConfigError, option

DEFAULT_SHARES = [0.001, 0.01, 0.05, 0.1]


@dataclass
class AnalysisConfig:
    """Gradient sparsity analysis (``sift-llm analyze``): is the gradient quasi-sparse, and which density fits."""

    batches: int = option(
        4,
        min=1,
        help="micro-batches (train.micro_batch_size examples each, the training data order) whose gradients are "
        "measured; batch 1 plays the SIFT selection batch, later ones test how well its top set carries over",
    )
    shares: list[float] = option(
        default_factory=lambda: list(DEFAULT_SHARES),
        help="fractions of each matrix's entries (largest |g| first) whose share of the squared gradient norm "
        "is reported; each in (0, 1]",
    )
    coverage_share: float = option(
        0.01,
        min=0.0,
        max=1.0,
        min_exclusive=True,
        help="size of the top set (fraction of each matrix) used for first-batch coverage, overlap across "
        "batches and the per-layer breakdown (SIFT Figure 4 uses 1%)",
    )
    keep: float = option(
        0.9,
        min=0.0,
        max=1.0,
        min_exclusive=True,
        help="share of the squared gradient norm the suggested density must keep",
    )
    random_init: bool = option(
        True, help="also measure the same architecture randomly initialised (seeded), on the same batches"
    )
    output: str | None = option(None, help="output directory; default <run_dir>/analysis")

    def __post_init__(self) -> None:
        if not self.shares:
            raise ConfigError("shares: at least one fraction is required")
        for i, share in enumerate(self.shares):
            if not 0.0 < share <= 1.0:
                raise ConfigError(f"shares[{i}]: {share!r} is out of range, allowed (0, 1]")
        self.shares = sorted(set(self.shares))

    @property
    def cover_max(self) -> float:
        """The largest first-batch top set whose coverage of later batches is measured (O(k) indices kept)."""
        return max(max(self.shares), self.coverage_share)
