"""Choosing the trainable entries from gradient salience, one matrix at a time, in O(selected) memory.

While a :class:`Selector` is calibrating, every SIFT layer's backward hands its output gradient and input
to :meth:`Selector.observe`, which forms the matrix's weight gradient G in fp32 (a bf16 product would round
G to 8 bits of mantissa, and the massive ties at the threshold would then go to the lowest rows), folds it
into small per-matrix state and drops it. At most one dense matrix exists at a time, and no full-model
gradient copy is ever made.

**The batch that is scored** is SIFT's "first batch": the first optimizer batch, i.e. ``micro_batches``
micro-batches on every data-parallel rank (micro-batch x accumulation x ranks examples). The caller runs
each micro-batch's forward and backward on the token-weighted loss (summed token losses divided by the
learned tokens of the whole batch, as in training), so G is the gradient of the first optimizer step, and
the choice equals a single process's choice on the concatenated batch.

**Data parallelism.** Each micro-batch's G is reduced to slices: every rank keeps the sum over ranks of its
own contiguous slice of the flat matrix (on gloo by an all-to-all of the slices and a local sum, 2-3x faster
than gloo's reduce-scatter; the exchange of one matrix runs while autograd computes the next). Per-matrix
scope then scores only its slice and keeps a small superset of its local top-k (a threshold from a strided
sample, checked, so exact whatever the data); at :meth:`finalize` the ranks find every matrix's exact k-th
largest score by a few rounds of histograms over the candidates (one all-reduce of a small table a round),
and all-gather only the chosen positions, so every rank holds the single-process choice without exchanging
scores, and a cheap checksum proves the ranks agree. Global scope all-reduces each matrix (one at a time)
and keeps a running pool of the best candidates with a threshold, so its total cost is about one selection
over the budget rather than one re-sort of the pool per matrix.

Scores, with G the gradient of one whole batch:

- ``grad_abs``: |G| of the first batch (SIFT); ``grad_abs_sum``: |G| summed over batches;
- ``fisher``: G^2 summed; ``snip``: |W * G| summed; ``weight_abs``: |W|;
- ``random``: uniform numbers from a generator seeded by (seed, matrix position), identical on all ranks.

Accumulated metrics over N > 1 batches use a candidate pool: the first batch nominates the top
``pool_factor * k`` entries of each matrix (per_matrix) or of all matrices (global), and later batches add
their exact scores at those entries only. An entry outside the first batch's pool can never be chosen; this
is exact whenever the pool covers the matrix, and otherwise relies on the first batch's top set holding most
of the later batches' mass (SIFT, Figure 4). Ties always go to the lower flat position (for global scope:
earlier module, then lower position).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from sift_llm import runtime
from sift_llm.errors import UserError
from sift_llm.sift.layer import SiftLinear

if TYPE_CHECKING:
    from sift_llm.sift.model import SiftHandle


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest score (0-dim tensor), by selection rather than a top-k sort where that is faster.

    On CPU ``kthvalue`` (quickselect) is about 3x faster than ``topk`` at 1-5% of a 4096x4096 matrix; on
    accelerators ``topk``'s multi-block radix select is the fast path.
    """
    if scores.device.type == "cpu":
        return torch.kthvalue(scores, scores.numel() - k + 1).values
    return torch.topk(scores, k, sorted=False).values.min()


def top_k_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions (int64) of the ``k`` largest scores; among equal scores the lower position wins."""
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    threshold = kth_largest(scores, k)
    keep = torch.nonzero(scores >= threshold).squeeze(1)  # ascending positions
    excess = keep.numel() - k
    if excess > 0:  # more ties at the threshold than places: the highest-positioned ties lose
        tied = torch.nonzero(scores[keep] == threshold).squeeze(1)
        mask = torch.ones(keep.numel(), dtype=torch.bool, device=keep.device)
        mask[tied[-excess:]] = False
        keep = keep[mask]
    return keep


def top_k_by_key(scores: torch.Tensor, keys: torch.Tensor, k: int) -> torch.Tensor:
    """Positions (in no particular order) of the ``k`` largest scores; among equal scores the lower key wins.

    Unlike :func:`top_k_positions` the entries need not be in key order: only the ties at the threshold
    are compared by key.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    threshold = kth_largest(scores, k)
    above = torch.nonzero(scores > threshold).squeeze(1)
    tied = torch.nonzero(scores == threshold).squeeze(1)
    need = k - above.numel()
    if need < tied.numel():
        tied = tied[keys[tied].argsort()[:need]]
    return torch.cat([above, tied])


# The strided sample that places a candidate threshold: a stride coprime with the power-of-two row lengths of
# transformer matrices visits every column (gradients are column-structured: outlier input features).
_SAMPLE_STRIDE = 31
_MIN_SAMPLED = 64  # expected sampled entries above the k-th largest below which the exact path is used
_MERGE_BINS = 1024  # buckets per matrix and round of the exact merge (4 rounds cover the 2^31 fp32 bit patterns)


def _sampled_floor(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """A score a few standard deviations below the ``k``-th largest, from a strided sample (CPU only).

    None where the sample is too small to place it (or on an accelerator, where the exact selection is fast):
    the caller then selects exactly. The caller must check that at least ``k`` entries reach the floor.
    """
    n = scores.numel()
    expected = k / _SAMPLE_STRIDE
    if scores.device.type != "cpu" or expected < _MIN_SAMPLED or k >= n:
        return None
    sample = scores[::_SAMPLE_STRIDE]
    rank = min(sample.numel(), math.ceil(expected * (sample.numel() * _SAMPLE_STRIDE / n) + 3 * math.sqrt(expected) + 8))
    return kth_largest(sample, rank)


def top_k_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """(ascending positions, floor): a small superset of the ``k`` best entries, for an exact merge later.

    Guarantees, whatever the data: every entry scoring above ``floor`` is a candidate; the candidates scoring
    exactly ``floor`` are the lowest-positioned entries with that score; and at least ``min(k, n)`` candidates
    score ``>= floor`` (``floor`` is -inf when every entry is a candidate). So the set holds the top-k with ties
    to the lower position, and counts of candidates above any value greater than ``floor`` are exact.

    On a CPU the threshold comes from a strided sample (one compare pass and one compaction over ``scores``
    instead of a selection over all of them, 5-10x cheaper than ``kthvalue``); the sample's estimate is set a
    few standard deviations low, and when it still falls short (or ``k`` is small) the exact top-k is taken.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device), -math.inf
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device), math.inf
    floor = _sampled_floor(scores, k)
    if floor is not None:
        keep = torch.nonzero(scores >= floor).squeeze(1)
        count = keep.numel()
        if k <= count <= 2 * k + 1024:
            return keep, float(floor)
        if count > k:  # far too many (massive ties at the sampled value): cut to the exact top-k of the candidates
            kept = scores[keep]
            best = top_k_positions(kept, k)
            return keep[best], float(kept[best].min())
    best = top_k_positions(scores, k)
    return best, float(scores[best].min())


def weight_gradient(grad_out: torch.Tensor, inputs: torch.Tensor, padded_numel: int | None = None,
                    buffer: torch.Tensor | None = None) -> torch.Tensor:
    """``(grad_out^T @ inputs).flatten()`` in fp32, optionally zero-padded to ``padded_numel`` entries.

    ``grad_out`` is (tokens, out), ``inputs`` (tokens, in). Narrow inputs are multiplied with fp32
    accumulation and an fp32 result (tensor cores where the device offers an fp32-output product, an
    exact upcast elsewhere), so scores never carry bf16 rounding. ``buffer``: a flat fp32 tensor of at least
    that many entries to write into (a view of it is returned), so that no matrix-sized allocation (and, on a
    CPU, no fresh zeroed pages) is paid per matrix.
    """
    out_features, in_features = grad_out.shape[1], inputs.shape[1]
    numel = out_features * in_features
    size = max(numel, padded_numel or 0)
    if buffer is not None and buffer.numel() >= size:
        flat = buffer[:size]
    else:
        flat = torch.empty(size, dtype=torch.float32, device=grad_out.device)
    if flat.numel() > numel:
        flat[numel:].zero_()
    target = flat[:numel].view(out_features, in_features)
    if grad_out.dtype == inputs.dtype == torch.float32:
        torch.mm(grad_out.t(), inputs, out=target)
    elif grad_out.dtype == inputs.dtype and grad_out.device.type == "cuda" and _has_fp32_output_mm():
        target.copy_(torch.mm(grad_out.t(), inputs, out_dtype=torch.float32))
    else:
        torch.mm(grad_out.t().float(), inputs.float(), out=target)
    return flat


@contextlib.contextmanager
def _no_error():
    try:
        yield
    except (RuntimeError, TypeError, NotImplementedError):
        pass


def _has_fp32_output_mm() -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` exists in this torch build (CUDA, torch >= 2.8)."""
    global _FP32_OUTPUT_MM
    if _FP32_OUTPUT_MM is None:
        _FP32_OUTPUT_MM = False
        with _no_error():
            probe = torch.ones(2, 2, dtype=torch.bfloat16, device="cuda")
            _FP32_OUTPUT_MM = torch.mm(probe, probe, out_dtype=torch.float32).dtype == torch.float32
    return _FP32_OUTPUT_MM


_FP32_OUTPUT_MM: bool | None = None


# torch 2.13 renamed the single-tensor collectives; older releases have only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass
class MatrixSelection:
    """What the selection kept in one matrix; shares are of the metric's mass and of sum(g^2)."""

    name: str
    shape: tuple[int, int]
    selected: int
    density: float
    score_share: float
    grad_sq_share: float


@dataclass
class SelectionReport:
    """The outcome of a selection: per-matrix counts and captured shares, totals, timing."""

    metric: str
    scope: str
    batches: int
    matrices: list[MatrixSelection]
    selected: int
    entries: int
    density: float
    score_share: float
    grad_sq_share: float
    calibration_seconds: float
    finalize_seconds: float
    micro_batches: int = 1  # micro-batches per rank in each scored batch
    ranks: int = 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        batch = f"{self.batches} batch(es) of {self.micro_batches} micro-batch(es) x {self.ranks} rank(s)"
        return (
            f"SIFT selection ({self.metric}, {self.scope}, {batch}): {self.selected:,} of "
            f"{self.entries:,} entries ({self.density:.4%}) in {len(self.matrices)} matrices hold "
            f"{self.grad_sq_share:.2%} of sum(g^2); {self.calibration_seconds:.2f} s"
        )


@dataclass
class _MatrixState:
    """Per-matrix selection state; tensors hold one entry per candidate (or this rank's slice), never more."""

    layer: SiftLinear
    ordinal: int
    offset: int  # position of the matrix's first entry in the concatenation of all targets (module order)
    lo: int = 0  # this rank's slice [lo, hi) of the flat matrix
    hi: int = 0
    padded: int = 0  # flat size padded to a multiple of the world size (reduce-scatter needs equal slices)
    micro: int = 0  # micro-batches folded into ``acc`` so far
    acc: torch.Tensor | None = None  # this rank's slice of the current batch's gradient, summed over ranks
    batches: int = 0
    chosen: torch.Tensor | None = None  # the final sorted flat positions, once known
    pool: torch.Tensor | None = None  # sorted candidate positions (per_matrix: local to [lo, hi); global: flat)
    score: torch.Tensor | None = None  # metric summed over batches at the pool, fp32
    grad_sq: torch.Tensor | None = None  # g^2 summed over batches at the pool, fp32
    totals: list[torch.Tensor] = field(default_factory=list)  # per batch: (score sum, sum g^2) over the slice
    kept: torch.Tensor | None = None  # (score, g^2) summed at the chosen positions of the slice
    # Single-batch per-matrix scope: this rank's candidates (top_k_candidates), merged exactly at finalize.
    cand_pos: torch.Tensor | None = None  # ascending positions in the slice (int32 where they fit)
    cand_score: torch.Tensor | None = None
    cand_grad_sq: torch.Tensor | None = None  # g^2 there, kept only for metrics whose score does not give it
    floor: float = -math.inf


class Selector:
    """Scores gradients during calibration and fixes each SIFT layer's indices at :meth:`finalize`.

    The caller owns forward and backward (plain autograd on the bare module, also under DeepSpeed)::

        selector = handle.selector(micro_batches=accumulation)
        with selector.calibrating():
            for batch in range(config.calibration_batches):
                for micro_batch in that batch's micro-batches:       # ``micro_batches`` of them
                    (token_loss_sum(micro_batch) / batch_tokens).backward()
        report = selector.finalize()

    Each micro-batch must run every targeted layer exactly once. Under data parallelism every rank runs the
    same number of micro-batches on its own data; the collectives happen inside backward, in the same order
    on all ranks. Every parameter is frozen while calibrating, so no optimizer, DDP or DeepSpeed hook sees a
    calibration gradient.
    """

    def __init__(self, handle: SiftHandle, group: dist.ProcessGroup | None = None, micro_batches: int = 1):
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
        self.handle = handle
        self.config = handle.config
        self.group = group
        self.micro_batches = micro_batches
        self.world = dist.get_world_size(group) if self._distributed_available() else 1
        self.rank = dist.get_rank(group) if self.world > 1 else 0
        # Per-matrix scope scores slices; global scope needs whole matrices (its pool spans them all).
        self.sharded = self.world > 1 and self.config.scope == "per_matrix"
        self._states: dict[str, _MatrixState] = {}
        offset = 0
        for ordinal, (name, layer) in enumerate(handle.layers.items()):
            state = _MatrixState(layer=layer, ordinal=ordinal, offset=offset)
            numel = layer.numel_weight
            per_rank = math.ceil(numel / self.world)
            state.padded = per_rank * self.world
            state.lo, state.hi = (min(numel, self.rank * per_rank), min(numel, (self.rank + 1) * per_rank))
            if not self.sharded:
                state.lo, state.hi = 0, numel
            self._states[name] = state
            offset += numel
        factor = self.config.pool_factor if self.config.accumulates else 1.0
        self._global_pool_size = min(offset, math.ceil(factor * handle.global_budget))
        self._global_chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # keys, score, grad_sq
        self._global_count = 0
        self._global_threshold: torch.Tensor | None = None
        self.probe = torch.zeros((), requires_grad=True)
        self._largest = max((st.padded if self.sharded else st.layer.numel_weight) for st in self._states.values()) \
            if self._states else 0
        self._buffers: dict[str, torch.Tensor] = {}  # flat fp32 work space of the largest matrix, reused
        self._pending: tuple[_MatrixState, Callable[[], torch.Tensor]] | None = None  # an exchange in flight
        self._flip = 0
        self._started: float | None = None
        self._finalized = False

    @property
    def batches(self) -> int:
        """Complete calibration batches observed so far."""
        return max(state.batches for state in self._states.values())

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[Selector]:
        """Within this block, backward passes score gradients instead of producing values' gradients."""
        if self._finalized or self.handle.selected:
            raise UserError("the SIFT selection is already fixed; calibration runs once, before training")
        if self._started is None:
            self._started = time.perf_counter()
        # Every parameter is frozen meanwhile, so DeepSpeed's gradient hooks and the optimizer see nothing;
        # the probe alone makes autograd run the SIFT layers' backward.
        paused = [p for p in self.handle.model.parameters() if p.requires_grad]
        for param in paused:
            param.requires_grad_(False)
        for state in self._states.values():
            state.layer._observer = self
        try:
            yield self
            self._complete_pending()
        finally:
            self._pending = None  # after an error the peers may never complete it
            for state in self._states.values():
                state.layer._observer = None
            for param in paused:
                param.requires_grad_(True)

    def observe(self, layer: SiftLinear, grad_out: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> None:
        """Fold one micro-batch's weight gradient of one matrix into the selection (called in backward).

        ``grad_out`` is (tokens, out) and ``inputs`` (tokens, in); ``weight`` the (gathered) base weight.
        """
        self._complete_pending()
        state = self._states[layer.sift_name]
        if state.batches >= self.config.calibration_batches:
            raise UserError(
                f"{layer.sift_name}: more calibration batches than calibration_batches="
                f"{self.config.calibration_batches} (x {self.micro_batches} micro-batches; or the layer ran twice "
                "in one forward)"
            )
        # Under data parallelism the exchange of this matrix runs while autograd computes the next one (two sets
        # of work buffers, alternating), unless the metric reads the weight, which ZeRO-3 may release meanwhile.
        overlap = self.world > 1 and self.config.metric not in ("snip", "weight_abs")
        tag = self._flip if overlap else 0
        self._flip ^= overlap
        grad = weight_gradient(grad_out, inputs, state.padded if self.sharded else None,
                               self._buffer(f"grad{tag}", state))
        result = self._reduce_to_slice(state, grad, tag, overlap)
        if overlap:
            self._pending = (state, result)
        else:
            self._absorb(state, result(), weight)

    def _complete_pending(self) -> None:
        """Finish the previous matrix's exchange (it ran during the next matrix's backward) and fold it in."""
        if self._pending is not None:
            state, result = self._pending
            self._pending = None
            self._absorb(state, result(), None)

    def _absorb(self, state: _MatrixState, part: torch.Tensor, weight: torch.Tensor | None) -> None:
        """One micro-batch's reduced gradient (slice) into the batch sum; a complete batch into the selection."""
        if state.acc is None:
            # The work buffers are reused by later matrices: a batch of several micro-batches needs its own sum.
            state.acc = part.clone() if self.micro_batches > 1 else part
        else:
            state.acc += part
        state.micro += 1
        if state.micro == self.micro_batches:
            batch_grad, state.acc, state.micro = state.acc, None, 0
            self._fold(state, batch_grad, weight)
            state.batches += 1

    def finalize(self) -> SelectionReport:
        """Fix every layer's indices (sorted, values zero) from the calibration scores and report."""
        if self._finalized:
            raise UserError("Selector.finalize() was already called")
        start = time.perf_counter()
        self._complete_pending()
        self._check_batches()
        states = list(self._states.values())
        totals = self._reduced_totals(states)
        self._check_finite(states, totals)
        if self.config.scope == "global":
            self._finish_global(states)
        elif self.config.accumulates:
            for state in states:  # accumulated metric: the best of the pool
                self._choose_from_pool(state)
        else:
            self._merge_candidates(states)
        self._buffers.clear()
        self._check_agreement(states)
        for state in states:
            state.layer.set_selection(state.chosen)
        self._finalized = True
        report = self._report(states, totals, start)
        runtime.log(report.summary())
        return report

    # -- reducing and scoring ------------------------------------------------------------------------------

    @staticmethod
    def _distributed_available() -> bool:
        return dist.is_available() and dist.is_initialized()

    def _buffer(self, name: str, state: _MatrixState) -> torch.Tensor:
        """A flat fp32 work buffer on the layer's device, sized for the largest matrix (allocated once)."""
        device = state.layer.weight.device
        buffer = self._buffers.get(name)
        if buffer is None or buffer.device != device:
            buffer = self._buffers[name] = torch.empty(self._largest, dtype=torch.float32, device=device)
        return buffer

    def _reduce_to_slice(self, state: _MatrixState, grad: torch.Tensor, tag: int = 0,
                         asynchronous: bool = False) -> Callable[[], torch.Tensor]:
        """A callable giving this rank's slice of the gradient summed over ranks (the whole matrix when not
        sharding); with ``asynchronous`` the collective is started now and the callable waits for it.

        Global scope needs the whole sum on every rank: one all-reduce. Per-matrix scope needs only this rank's
        slice: a reduce-scatter, which gloo (CPU) runs 2-3x slower than an all-to-all of the slices followed by
        a local sum, so on gloo the slices are exchanged and added here (the same bytes, the same sum).
        """
        if self.world == 1:
            return lambda: grad
        if not self.sharded:
            work = dist.all_reduce(grad, group=self.group, async_op=asynchronous)
            whole = grad[: state.layer.numel_weight]
            return lambda: (work.wait() if asynchronous else None, whole)[1]
        size = state.padded // self.world
        if dist.get_backend(self.group) == "gloo":
            received = self._buffer(f"received{tag}", state)[: state.padded]
            work = dist.all_to_all_single(received, grad, group=self.group, async_op=asynchronous)

            def combine() -> torch.Tensor:
                if asynchronous:
                    work.wait()
                chunks = received.view(self.world, size)
                part = torch.sum(chunks, dim=0) if self.world > 2 else torch.add(chunks[0], chunks[1], out=grad[:size])
                return part[: state.hi - state.lo]

            return combine if asynchronous else (lambda part=combine(): part)
        part = self._buffer(f"received{tag}", state)[:size]
        work = _reduce_scatter(part, grad, group=self.group, async_op=asynchronous)
        return lambda: (work.wait() if asynchronous else None, part[: state.hi - state.lo])[1]

    def _score(self, state: _MatrixState, grad: torch.Tensor, weight: torch.Tensor):
        """(score over the slice, sum of g^2 over it, f(positions) -> g^2 there); may overwrite ``grad``."""
        metric = self.config.metric
        grad_sq_total = torch.dot(grad, grad)
        if metric in ("grad_abs", "grad_abs_sum"):
            score = grad.abs_()
            return score, grad_sq_total, lambda at: score[at].square()
        if metric == "fisher":
            score = grad.square_()
            return score, grad_sq_total, lambda at: score[at]
        if metric == "random":
            generator = torch.Generator(device=grad.device)
            generator.manual_seed(self.config.seed * 1_000_003 + state.ordinal)
            score = torch.rand(state.layer.numel_weight, generator=generator, device=grad.device)[state.lo : state.hi]
        else:
            w = weight.detach().reshape(-1)[state.lo : state.hi].to(torch.float32)
            score = (w * grad).abs_() if metric == "snip" else w.abs()
        return score, grad_sq_total, lambda at: grad[at].square()

    def _fold(self, state: _MatrixState, grad: torch.Tensor, weight: torch.Tensor) -> None:
        """One complete batch gradient (this rank's slice, or the whole matrix) into the matrix's state."""
        score, grad_sq_total, grad_sq_at = self._score(state, grad, weight)
        # One pass serves the report and the finiteness check: a sum is finite only if every entry is.
        totals = torch.stack([score.sum(), grad_sq_total])
        state.totals.append(totals)
        if not bool(torch.isfinite(totals).all()):
            # Keep going so every rank stays in step in the collectives; finalize raises on all ranks.
            score = torch.zeros_like(score)
            grad_sq_at = lambda at: torch.zeros(at.numel(), device=score.device)  # noqa: E731
        k = state.layer.k
        if self.config.scope == "global":
            if state.batches == 0:
                self._global_add(state, score, grad_sq_at)
            else:
                self._split_global_pool()
                state.score += score[state.pool]
                state.grad_sq += grad_sq_at(state.pool)
            return
        if state.batches > 0:
            state.score += score[state.pool]
            state.grad_sq += grad_sq_at(state.pool)
            return
        if not self.config.accumulates:
            # This rank's candidates only; finalize merges every matrix's across ranks in a few collectives.
            positions, state.floor = top_k_candidates(score, k)
            state.cand_score = score[positions]
            if self.config.metric not in ("grad_abs", "grad_abs_sum", "fisher"):
                state.cand_grad_sq = grad_sq_at(positions)
            state.cand_pos = positions.to(torch.int32) if score.numel() < 2**31 else positions
            return
        numel = state.layer.numel_weight
        size = min(numel, math.ceil(self.config.pool_factor * k))
        nominated = self._top_k(score, size, offset=state.lo)
        local = self._local(state, nominated)
        state.pool, state.score, state.grad_sq = local, score[local], grad_sq_at(local)

    def _local(self, state: _MatrixState, positions: torch.Tensor) -> torch.Tensor:
        """The positions that fall in this rank's slice, relative to its start."""
        if not self.sharded:
            return positions
        lo, hi = torch.searchsorted(positions, torch.tensor([state.lo, state.hi], device=positions.device)).tolist()
        return positions[lo:hi] - state.lo

    def _top_k(self, score: torch.Tensor, k: int, offset: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted flat positions of the ``k`` best entries over all ranks' slices, identical on every rank.

        ``score`` holds this rank's candidates at ``positions`` (sorted flat positions; default
        ``offset + arange``). Each rank sends its own top-k; the union holds the overall top-k, and every
        rank merges it by the same rule (ties to the lower position, ranks' slices being in position order).
        """
        local = top_k_positions(score, min(k, score.numel()))
        at = local + offset if positions is None else positions[local]
        if not self.sharded:
            return at
        scores, where = self._all_gather_varying([score[local], at])
        return where[top_k_positions(scores, k)]

    def _all_gather_varying(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each 1-D tensor concatenated over ranks in rank order (lengths may differ between ranks)."""
        device = tensors[0].device
        count = torch.tensor([tensors[0].numel()], dtype=torch.int64, device=device)
        counts = torch.empty(self.world, dtype=torch.int64, device=device)
        _all_gather(counts, count, group=self.group)
        counts = counts.tolist()
        longest = max(counts)
        out = []
        for tensor in tensors:
            padded = torch.zeros(longest, dtype=tensor.dtype, device=device)
            padded[: tensor.numel()] = tensor
            gathered = torch.empty(longest * self.world, dtype=tensor.dtype, device=device)
            _all_gather(gathered, padded, group=self.group)
            out.append(torch.cat([gathered[r * longest : r * longest + c] for r, c in enumerate(counts)]))
        return out

    def _choose_from_pool(self, state: _MatrixState) -> None:
        """Accumulated per-matrix metric: the best ``k`` of the pool, kept shares from this rank's part."""
        state.chosen = self._top_k(state.score, state.layer.k, positions=state.pool + state.lo)
        mine = torch.isin(state.pool + state.lo, state.chosen)
        state.kept = torch.stack([state.score[mine].sum(), state.grad_sq[mine].sum()])

    # -- per-matrix scope, one batch: the exact merge of every rank's candidates ------------------------------

    def _merge_candidates(self, states: list[_MatrixState]) -> None:
        """Every matrix's top-k over all ranks' slices, identical on every rank, from the candidates alone.

        The k-th largest score of each matrix (``tau``) is found by bisection on the scores' bit patterns (the
        scores are non-negative, so their fp32 bits order like their values): each round counts, per matrix,
        the candidates scoring at least the midpoint and sums the counts over ranks in one all-reduce of a
        (matrices,) vector, about 30 rounds in all. The counts are exact above every rank's candidate floor
        (:func:`top_k_candidates`) and the search never goes below the largest floor, so ``tau`` is exactly the
        single-process k-th largest. Entries above ``tau`` are chosen; ties at ``tau`` go to the lowest
        positions, i.e. to the lower ranks' slices first. Finally each rank's chosen positions are all-gathered
        (4 or 8 B per selected entry in all), so ranks exchange neither whole gradients nor candidate scores.
        """
        device = states[0].cand_score.device
        ks = torch.tensor([state.layer.k for state in states], dtype=torch.int64, device=device)
        bits = [state.cand_score.view(torch.int32) for state in states]
        # lo: the largest floor over ranks (0 = +0.0 where every entry is a candidate); hi: one past the largest score.
        floors = torch.tensor([state.floor if state.floor > -math.inf else 0.0 for state in states],
                              dtype=torch.float32, device=device).view(torch.int32).to(torch.int64)
        tops = torch.stack([b.max().to(torch.int64) if b.numel() else torch.tensor(-1, device=device) for b in bits])
        bounds = torch.stack([floors, tops + 1])
        if self.world > 1:
            dist.all_reduce(bounds, op=dist.ReduceOp.MAX, group=self.group)
        lo, hi = bounds[0], bounds[1]
        numels = torch.tensor([state.layer.numel_weight for state in states], dtype=torch.int64, device=device)
        trivial = (ks <= 0) | (ks >= numels)
        hi = torch.where(trivial, lo + 1, torch.maximum(hi, lo + 1))
        # Narrow [lo, hi) per matrix with histograms of the candidates' bits: _MERGE_BINS buckets a round, summed
        # over ranks in one all-reduce of a (matrices, buckets + 1) table, so about 4 rounds find every tau.
        bins = _MERGE_BINS
        lows, highs, need_k = lo.tolist(), hi.tolist(), ks.tolist()
        windows = list(bits)  # this rank's candidates inside [lo, hi), per matrix
        above_mine = [0] * len(states)  # this rank's candidates at or above hi
        while True:
            active = [i for i in range(len(states)) if highs[i] - lows[i] > 1]
            if not active:
                break
            table = torch.zeros(len(states), bins + 1, dtype=torch.int64, device=device)
            steps = {}
            for i in active:
                window = windows[i]
                window = windows[i] = window[(window >= lows[i]) & (window < highs[i])]
                steps[i] = step = -(-(highs[i] - lows[i]) // bins)
                table[i, :bins] = torch.bincount((window.to(torch.int64) - lows[i]) // step, minlength=bins)
                table[i, bins] = above_mine[i]
            mine = table.clone() if self.world > 1 else table
            if self.world > 1:
                dist.all_reduce(table, group=self.group)
            suffixes = table[:, :bins].flip(1).cumsum(1).flip(1) + table[:, bins : bins + 1]  # count >= bucket start
            for i in active:
                j = int(torch.nonzero(suffixes[i] >= need_k[i]).max())  # bucket 0 always qualifies
                above_mine[i] += int(mine[i, j + 1 : bins].sum())
                lows[i], highs[i] = lows[i] + j * steps[i], min(highs[i], lows[i] + (j + 1) * steps[i])
        lo = torch.tensor(lows, dtype=torch.int64, device=device)
        tau = lo
        above = torch.stack([(b > t).sum() for b, t in zip(bits, tau, strict=True)])
        ties = torch.stack([(b == t).sum() for b, t in zip(bits, tau, strict=True)])
        if self.world > 1:
            per_rank = torch.empty(self.world * 2 * len(states), dtype=torch.int64, device=device)
            _all_gather(per_rank, torch.stack([above, ties]).reshape(-1), group=self.group)
            per_rank = per_rank.view(self.world, 2, len(states))
            need = ks - per_rank[:, 0].sum(dim=0)
            before = per_rank[: self.rank, 1].sum(dim=0)
        else:
            need, before = ks - above, torch.zeros_like(ks)
        take = (need - before).clamp(min=0).minimum(ties)
        chosen = []
        for i, state in enumerate(states):
            k = state.layer.k
            if k >= state.layer.numel_weight:  # every entry (the candidates are this rank's whole slice)
                mine = torch.arange(state.cand_pos.numel(), device=device)
            elif k <= 0:
                mine = torch.empty(0, dtype=torch.int64, device=device)
            else:
                tied = bits[i] == tau[i]
                mine = torch.nonzero((bits[i] > tau[i]) | (tied & (tied.cumsum(0) <= take[i]))).squeeze(1)
            state.kept = torch.stack([state.cand_score[mine].sum(), self._cand_grad_sq(state, mine).sum()])
            chosen.append(state.cand_pos[mine].to(torch.int64) + state.lo)
            state.cand_pos = state.cand_score = state.cand_grad_sq = None
        for state, indices in zip(states, self._gather_chosen(chosen, device), strict=True):
            state.chosen = indices

    def _cand_grad_sq(self, state: _MatrixState, at: torch.Tensor) -> torch.Tensor:
        """g^2 at the candidates ``at``, from the score where the metric gives it."""
        if state.cand_grad_sq is not None:
            return state.cand_grad_sq[at]
        if self.config.metric == "fisher":
            return state.cand_score[at]
        return state.cand_score[at].square()  # grad_abs: the score is |g|

    def _gather_chosen(self, chosen: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Every matrix's chosen positions from all ranks' parts (each sorted, slices in rank order)."""
        if self.world == 1:
            return chosen
        counts = torch.tensor([c.numel() for c in chosen], dtype=torch.int64, device=device)
        per_rank = torch.empty(self.world * len(chosen), dtype=torch.int64, device=device)
        _all_gather(per_rank, counts, group=self.group)
        per_rank = per_rank.view(self.world, len(chosen))
        narrow = all(state.layer.numel_weight < 2**31 for state in self._states.values())
        flat = torch.cat(chosen).to(torch.int32 if narrow else torch.int64)
        totals = per_rank.sum(dim=1).tolist()
        longest = max(totals)
        padded = torch.zeros(longest, dtype=flat.dtype, device=device)
        padded[: flat.numel()] = flat
        gathered = torch.empty(self.world * longest, dtype=flat.dtype, device=device)
        _all_gather(gathered, padded, group=self.group)
        pieces = [gathered[r * longest : r * longest + totals[r]].split(per_rank[r].tolist()) for r in range(self.world)]
        return [torch.cat([pieces[r][i] for r in range(self.world)]).to(torch.int64) for i in range(len(chosen))]

    # -- global scope ----------------------------------------------------------------------------------------

    def _global_add(self, state: _MatrixState, score: torch.Tensor, grad_sq_at: Callable) -> None:
        """First batch: add this matrix's candidates to the running global pool.

        Once the pool holds ``size`` entries, its weakest score is a threshold a later entry must beat
        strictly (an equal score loses the tie to the earlier module). The pool is cut back to ``size``
        whenever it doubles, so the total work is about one selection over the candidates.
        """
        size = self._global_pool_size
        if self._global_threshold is None:
            positions = top_k_positions(score, min(score.numel(), size))
        else:
            positions = torch.nonzero(score > self._global_threshold).squeeze(1)
            if positions.numel() > size:
                positions = positions[top_k_positions(score[positions], size)]
        self._global_chunks.append((positions + state.offset, score[positions], grad_sq_at(positions)))
        self._global_count += positions.numel()
        if self._global_count >= 2 * size or (self._global_threshold is None and self._global_count >= size):
            self._prune_global_pool()

    def _prune_global_pool(self, exact: bool = False) -> None:
        # Chunks arrive in backward order (last module first), so the pool is not in key order; only the
        # ties at the threshold need the keys to be compared, and the pool is sorted once, when split.
        # While the backward pass streams, a prune only needs a floor at or below the pool's size-th best
        # score: every entry reaching it stays (a superset a few per mille over size), and the floor becomes
        # the bar later entries must beat, as the exact cut's minimum would. That is a compare and a
        # compaction instead of a selection over twice the budget at each doubling; the one exact cut is
        # made when the pool is split, over a pool about the budget's size.
        keys, scores, grad_sq = (torch.cat(parts) for parts in zip(*self._global_chunks, strict=True))
        size = self._global_pool_size
        if keys.numel() > size:
            keep = None
            floor = None if exact else _sampled_floor(scores, size)
            if floor is not None:
                keep = torch.nonzero(scores >= floor).squeeze(1)
                if not size <= keep.numel() <= size + size // 4 + 1024:
                    keep = None  # the sample misplaced the floor (ties, or an unlucky draw): cut exactly
            if keep is None:
                keep = top_k_by_key(scores, keys, size)
            keys, scores, grad_sq = keys[keep], scores[keep], grad_sq[keep]
        if keys.numel() >= self._global_pool_size and keys.numel():
            self._global_threshold = scores.min()
        self._global_chunks = [(keys, scores, grad_sq)]
        self._global_count = keys.numel()

    def _split_global_pool(self) -> None:
        """Hand each matrix its share of the first batch's global pool (once, after the first batch)."""
        if not self._global_chunks:
            return
        self._prune_global_pool(exact=True)
        keys, scores, grad_sq = self._global_chunks[0]
        order = keys.argsort()
        keys, scores, grad_sq = keys[order], scores[order], grad_sq[order]
        for state in self._states.values():
            lo, hi = torch.searchsorted(
                keys, torch.tensor([state.offset, state.offset + state.layer.numel_weight], device=keys.device)
            ).tolist()
            state.pool, state.score, state.grad_sq = keys[lo:hi] - state.offset, scores[lo:hi], grad_sq[lo:hi]
        self._global_chunks = []

    def _finish_global(self, states: list[_MatrixState]) -> None:
        self._split_global_pool()
        keep = top_k_positions(torch.cat([state.score for state in states]), self.handle.global_budget)
        starts = [0, *itertools.accumulate(state.pool.numel() for state in states)]
        edges = torch.searchsorted(keep, torch.tensor(starts, device=keep.device)).tolist()
        for i, state in enumerate(states):
            mine = keep[edges[i] : edges[i + 1]] - starts[i]
            state.chosen = state.pool[mine]
            state.kept = torch.stack([state.score[mine].sum(), state.grad_sq[mine].sum()])

    # -- finalizing ----------------------------------------------------------------------------------------

    def _check_batches(self) -> None:
        seen = self.batches
        if seen == 0:
            partial = any(state.micro for state in self._states.values())
            ran = f"only part of one (of {self.micro_batches} micro-batches)" if partial else "was run"
            raise UserError(f"no calibration batch {ran}: run forward/backward inside selector.calibrating()")
        behind = [name for name, state in self._states.items() if state.batches != seen or state.micro]
        if behind:
            shown = ", ".join(behind[:5]) + (f" and {len(behind) - 5} more" if len(behind) > 5 else "")
            raise UserError(f"SIFT layers that did not run in every calibration micro-batch ({seen} batches): {shown}")
        if seen < self.config.calibration_batches:
            runtime.log(f"SIFT selection: {seen} of {self.config.calibration_batches} calibration batches ran")

    def _reduced_totals(self, states: list[_MatrixState]) -> torch.Tensor:
        """Per matrix and batch: (score sum, sum g^2) over the whole matrix, on every rank."""
        totals = torch.stack([torch.stack(state.totals) for state in states])  # (matrices, batches, 2)
        if self.sharded:
            dist.all_reduce(totals, group=self.group)
        return totals

    def _check_finite(self, states: list[_MatrixState], totals: torch.Tensor) -> None:
        bad = (~torch.isfinite(totals)).any(dim=2).nonzero().tolist()
        if bad:
            matrix, batch = bad[0]
            raise UserError(
                f"{states[matrix].layer.sift_name}: non-finite gradient in calibration batch {batch + 1}; "
                "check the data and the model's weights, or calibrate in bf16/fp32 rather than fp16"
            )

    def _check_agreement(self, states: list[_MatrixState]) -> None:
        """Every rank must hold the same indices: compare (count, sum, sum of squares) across ranks."""
        if self.world == 1:
            return
        rows = [torch.stack([c.numel() * torch.ones((), dtype=torch.float64, device=c.device),
                             c.double().sum(), c.double().square().sum()])
                for c in (state.chosen for state in states)]  # fmt: skip
        mine = torch.stack(rows)
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        if not torch.equal(low, high):
            raise RuntimeError("SIFT selection: ranks chose different indices (a determinism bug; please report it)")

    def _report(self, states: list[_MatrixState], totals: torch.Tensor, start: float) -> SelectionReport:
        # One stacked tensor per quantity, so the device syncs once.
        whole = totals.sum(dim=1).cpu()  # (matrices, 2) over batches
        kept = torch.stack([state.kept for state in states])
        if self.sharded:
            dist.all_reduce(kept, group=self.group)
        kept = kept.cpu()
        matrices = []
        for i, state in enumerate(states):
            layer = state.layer
            selected = state.chosen.numel()
            matrices.append(
                MatrixSelection(
                    name=layer.sift_name,
                    shape=(layer.out_features, layer.in_features),
                    selected=selected,
                    density=selected / layer.numel_weight,
                    score_share=_share(kept[i, 0], whole[i, 0]),
                    grad_sq_share=_share(kept[i, 1], whole[i, 1]),
                )
            )
        selected = sum(m.selected for m in matrices)
        entries = sum(state.layer.numel_weight for state in states)
        now = time.perf_counter()
        return SelectionReport(
            metric=self.config.metric,
            scope=self.config.scope,
            batches=self.batches,
            matrices=matrices,
            selected=selected,
            entries=entries,
            density=selected / entries,
            score_share=_share(kept[:, 0].sum(), whole[:, 0].sum()),
            grad_sq_share=_share(kept[:, 1].sum(), whole[:, 1].sum()),
            calibration_seconds=now - (self._started or start),
            finalize_seconds=now - start,
            micro_batches=self.micro_batches,
            ranks=self.world,
        )


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    whole = float(whole)
    return float(part) / whole if whole > 0 else 0.0
