"""The SIFT layer's kernels on one matrix: the values' gradient by dense row blocks vs the sampled product vs
the Triton tile kernel (CUDA with triton), and one training pass (forward + backward) with the previous
kernels vs the current ones, per density.

This is where :data:`sift_llm.sift.layer.SAMPLED_MAX_DENSITY` and :data:`~sift_llm.sift.layer.TRITON_MAX_DENSITY`
come from: the densities below which those paths are faster on a device.

Two entry points: :func:`run_kernels` is the bench part (``sift-llm bench --only kernels``, one matrix from the
bench config), and ``python -m sift_llm.bench.kernels`` measures several shapes, two index patterns and a
sweep of the Triton kernels' tile shapes into one JSON (``scripts/gpu_checks.sh``; ``--dry-run`` runs it on
tiny shapes, on the CPU too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sift_llm.bench.common import median, synchronize, timed
from sift_llm.bench.config import KernelsConfig
from sift_llm.runtime import default_device, log
from sift_llm.sift import SiftLinear, kernels
from sift_llm.sift.layer import TRITON_GROUP_ROWS, TRITON_TILE_COLS, sampled_weight_grad, sddmm_values_grad

LLAMA_7B_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # q/k/v/o, gate/up, down (out x in)
DENSITIES = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)
# Tile shapes of the Triton sweep: (group rows, tile columns, token block, warps, stages).
SWEEP = ((16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (16, 128, 128, 4, 3), (16, 128, 64, 8, 3), (16, 256, 64, 8, 3),
         (32, 64, 64, 4, 3), (32, 128, 64, 4, 3), (32, 128, 64, 8, 4))


def _best(fn: Callable[[], object], device: torch.device, repeats: int, inner: int = 1) -> float:
    """Median seconds of one ``fn()`` call over ``repeats`` timings of ``inner`` calls each, after a warm-up."""
    fn()  # warm-up (and compilation)
    if device.type != "cuda":
        return median(timed(fn, device) for _ in range(repeats))
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / inner)
    return statistics.median(samples)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def triton_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels are measured here: compiled ones only (never the CPU interpreter)."""
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16, torch.float32) and \
        kernels.triton_usable(device)


def random_pattern(out_f: int, in_f: int, k: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """k uniformly random sorted flat indices, drawn on ``device`` with ``generator`` (made for that device)."""
    return torch.randperm(out_f * in_f, generator=generator, device=device)[:k].sort().values.to(torch.int32)


def topk_pattern(grad: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k |grad^T x| entries: a gradient-selected pattern (clustered on large rows and columns)."""
    dense = (grad.t().float() @ x.float()).abs_().view(-1)
    indices = torch.topk(dense, k, sorted=False).indices
    return indices.sort().values.to(torch.int32)


def make_inputs(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, device: torch.device, pattern: str,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """grad (tokens, out) and x (tokens, in); for the "topk" pattern with log-normal per-channel scales
    (sigma 1), a stand-in for activation outlier channels that makes gradient top-k patterns clustered."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    grad = torch.randn(tokens, out_f, generator=generator)
    x = torch.randn(tokens, in_f, generator=generator)
    if pattern == "topk":
        grad = grad * torch.randn(out_f, generator=generator).exp()
        x = x * torch.randn(in_f, generator=generator).exp()
    return grad.to(device, dtype), x.to(device, dtype)


def measure_matrix(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, densities, *, pattern: str = "random",
                   repeats: int = 7, paths: tuple[str, ...] = ("dense", "sampled", "triton"), passes: bool = True,
                   device: torch.device | None = None) -> dict:
    """Per density: the values' gradient by each path, the Triton plan's statistics, the x @ S^T products
    (Triton, CSR) against the dense F.linear, and layer training passes per kernel choice."""
    device = device or default_device()
    inner = 5 if device.type == "cuda" else 1
    grad, x = make_inputs(out_f, in_f, tokens, dtype, device, pattern)
    generator = torch.Generator(device=device).manual_seed(1)
    use_triton = "triton" in paths and triton_runs(device, dtype)
    ops = kernels.load_triton_ops() if use_triton else None
    frozen = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x_train = x.detach().clone().requires_grad_(True)

    def frozen_pass():
        x_train.grad = None
        (frozen(x_train) * grad).sum().backward()

    frozen_s = _best(frozen_pass, device, repeats) if passes else None
    linear_s = _best(lambda: F.linear(x, frozen.weight), device, repeats, inner)
    rows = []
    for density in densities:
        k = max(1, round(density * out_f * in_f))
        indices = (random_pattern(out_f, in_f, k, generator, device) if pattern == "random"
                   else topk_pattern(grad, x, k))
        layer = SiftLinear.convert(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype), "kernel", k,
                                   torch.float32)
        layer.set_selection(indices)
        indices = layer.indices
        with torch.no_grad():
            layer.values.normal_(std=1e-3)
        row = {"density": density, "k": k, "pattern": pattern, "linear_s": linear_s, "pass_frozen_s": frozen_s}
        row["dense_dw_s"] = _best(lambda: sampled_weight_grad(grad, x, indices, layer.row_blocks()), device,
                                  repeats, inner)
        row["sampled_dw_s"] = (_best(lambda: sddmm_values_grad(grad, x, indices, in_f), device, repeats)
                               if "sampled" in paths else None)
        row["triton_dw_s"] = row["inc_triton_s"] = None
        started = time.perf_counter()
        plan = layer.tile_plan()
        synchronize(device)
        row["plan_build_s"] = time.perf_counter() - started
        row.update(plan_stats(plan))
        if ops is not None:
            row["triton_dw_s"] = _best(lambda: ops.values_grad(grad, x, plan), device, repeats, inner)
            row["inc_triton_s"] = _best(lambda: ops.increment_matmul(x, plan, layer.values), device, repeats, inner)
        patterns = kernels.increment_patterns(indices, out_f, in_f)
        row["inc_csr_s"] = _best(lambda: kernels.increment_matmul(x, patterns, layer.values), device, repeats)
        if passes:
            row.update(training_passes(layer, x_train, grad, device, repeats, use_triton))
        rows.append(row)
        del layer, plan, patterns
    return {"shape": [out_f, in_f], "tokens": tokens, "dtype": str(dtype).replace("torch.", ""), "pattern": pattern,
            "rows": rows, "triton_wins_up_to": wins_up_to(rows, "triton_dw_s"),
            "sampled_wins_up_to": wins_up_to(rows, "sampled_dw_s")}


def plan_stats(plan: kernels.TilePlan) -> dict:
    return {"union_per_entry": plan.union_size / plan.k if plan.k else 0.0, "load_ratio": plan.load_ratio(),
            "plan_bytes": plan.nbytes, "tiles": plan.tiles}


def training_passes(layer: SiftLinear, x_train: torch.Tensor, grad: torch.Tensor, device: torch.device, repeats: int,
                    use_triton: bool) -> dict:
    """Layer forward + backward with the previous kernels, the current auto choice, and each forced path."""

    def train_pass():
        layer.values.grad = None
        x_train.grad = None
        (layer(x_train) * grad).sum().backward()

    choices = {"pass_before_s": ("clone", "dense"), "pass_after_s": ("patch", "auto"),
               "pass_dense_s": ("patch", "dense")}
    if use_triton:
        choices.update({"pass_triton_s": ("patch", "triton"), "pass_increment_triton_s": ("increment", "triton")})
    out = {}
    for key, (merge, values_grad) in choices.items():
        layer.merge, layer.values_grad = merge, values_grad
        out[key] = _best(train_pass, device, repeats)
    layer.merge, layer.values_grad = "patch", "auto"
    return out


def wins_up_to(rows: list[dict], key: str) -> float | None:
    wins = [row["density"] for row in rows if row.get(key) is not None and row[key] < row["dense_dw_s"]]
    return max(wins) if wins else None


def sweep_tiles(out_f: int, in_f: int, tokens: int, dtype: torch.dtype, density: float, configs=SWEEP,
                repeats: int = 7, device: torch.device | None = None) -> list[dict]:
    """The Triton values' gradient for each tile shape (plan rebuilt per group rows / tile columns)."""
    device = device or default_device()
    if not triton_runs(device, dtype):
        return []
    ops = kernels.load_triton_ops()
    grad, x = make_inputs(out_f, in_f, tokens, dtype, device, "random")
    k = max(1, round(density * out_f * in_f))
    indices = random_pattern(out_f, in_f, k, torch.Generator(device=device).manual_seed(2), device)
    rows = []
    for group_rows, tile_cols, block_t, warps, stages in configs:
        plan = kernels.build_tile_plan(indices, out_f, in_f, group_rows, tile_cols)
        row = {"group_rows": group_rows, "tile_cols": tile_cols, "block_t": block_t, "num_warps": warps,
               "num_stages": stages, **plan_stats(plan)}
        try:
            row["triton_dw_s"] = _best(lambda: ops.values_grad(grad, x, plan, block_t=block_t, num_warps=warps,
                                                               num_stages=stages), device, repeats, 5)
            row["inc_triton_s"] = _best(lambda: ops.increment_matmul(x, plan, torch.ones(k, device=device),
                                                                     block_t=block_t, num_warps=warps,
                                                                     num_stages=stages), device, repeats, 5)
        except Exception as err:  # noqa: BLE001 - a tile shape the compiler rejects (e.g. shared memory) is a result
            row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        rows.append(row)
    return rows


def run_kernels(cfg: KernelsConfig) -> dict:
    """The bench part: one matrix of the bench config."""
    device = default_device()
    dtype = getattr(torch, cfg.dtype)
    paths = ("dense", "sampled", "triton")
    result = measure_matrix(cfg.out_features, cfg.in_features, cfg.tokens, dtype, cfg.densities, repeats=cfg.repeats,
                            paths=paths, device=device)
    return {"device": device_name(device), "device_type": device.type, "shape": result["shape"], "tokens": cfg.tokens,
            "dtype": cfg.dtype, "threads": torch.get_num_threads(), "sampled_wins_up_to": result["sampled_wins_up_to"],
            "triton_wins_up_to": result["triton_wins_up_to"], "triton": triton_version(), "rows": result["rows"]}


def triton_version() -> str | None:
    if not kernels.triton_importable():
        return None
    import importlib.metadata

    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def summarize(results: dict) -> list[str]:
    """Text lines: per shape and pattern, each path's time and the Triton speed-up at every density."""
    lines = [f"kernels on {results['device']} ({results['dtype']}, {results['tokens']} tokens, triton "
             f"{results['triton']}, Triton plan {TRITON_GROUP_ROWS}x{TRITON_TILE_COLS})"]
    for matrix in results["matrices"]:
        lines.append(f"  {matrix['shape'][0]}x{matrix['shape'][1]} {matrix['pattern']}: triton wins up to "
                     f"{matrix['triton_wins_up_to']}")
        for row in matrix["rows"]:
            speedup = f"x{row['dense_dw_s'] / row['triton_dw_s']:.2f}" if row.get("triton_dw_s") else "n/a"
            lines.append(f"    {row['density'] * 100:6.2f}%  dW: dense {_ms(row['dense_dw_s'])}, triton "
                         f"{_ms(row['triton_dw_s'])} ({speedup}), sampled {_ms(row['sampled_dw_s'])};  x@S^T: "
                         f"triton {_ms(row['inc_triton_s'])}, csr {_ms(row['inc_csr_s'])}, dense linear "
                         f"{_ms(row['linear_s'])};  union/entry {row['union_per_entry']:.2f}")
    for row in results.get("sweep", []):
        lines.append(f"  sweep rows {row['group_rows']} cols {row['tile_cols']} tokens {row['block_t']} warps "
                     f"{row['num_warps']} stages {row['num_stages']}: dW {_ms(row.get('triton_dw_s'))}, x@S^T "
                     f"{_ms(row.get('inc_triton_s'))} {row.get('error', '')}")
    return lines


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1e3:.3f} ms"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sift_llm.bench.kernels", description=(
        "Time the SIFT values' gradient (dense row blocks, sampled product, Triton tile kernel) and x @ S^T on "
        "several matrix shapes, index patterns and densities; write one JSON and print a summary."))
    parser.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in LLAMA_7B_SHAPES),
                        help="comma-separated OUTxIN matrix shapes (default: LLaMA-7B's three)")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--densities", default=",".join(str(d) for d in DENSITIES))
    parser.add_argument("--patterns", default="random,topk", help="random and/or topk (gradient-selected)")
    parser.add_argument("--paths", default="dense,triton", help="values' gradient paths besides dense: sampled, triton")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--no-passes", action="store_true", help="skip the layer training passes")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton tile-shape sweep")
    parser.add_argument("--out", type=Path, help="JSON file to write (default: print only)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, two densities, 1 repeat: checks the entry point (on the CPU too)")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.shapes, args.tokens, args.densities, args.repeats = "48x32,32x48", 16, "0.01,0.2", 1
    device = default_device()
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and dtype != torch.float32:
        log(f"kernels: no GPU; measuring in float32 instead of {args.dtype} on the CPU")
        dtype = torch.float32
    shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes.split(",") if shape]
    densities = [float(d) for d in args.densities.split(",") if d]
    paths = ("dense", *[p for p in args.paths.split(",") if p and p != "dense"])
    results = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
               "triton": triton_version(), "triton_measured": triton_runs(device, dtype),
               "dtype": str(dtype).replace("torch.", ""), "tokens": args.tokens, "paths": list(paths),
               "plan": {"group_rows": TRITON_GROUP_ROWS, "tile_cols": TRITON_TILE_COLS}, "matrices": []}
    for out_f, in_f in shapes:
        for pattern in [p for p in args.patterns.split(",") if p]:
            log(f"kernels: {out_f}x{in_f}, {pattern} pattern")
            results["matrices"].append(measure_matrix(out_f, in_f, args.tokens, dtype, densities, pattern=pattern,
                                                      repeats=args.repeats, paths=paths,
                                                      passes=not args.no_passes, device=device))
    if not args.no_sweep:
        out_f, in_f = max(shapes, key=lambda s: s[0] * s[1])
        results["sweep_shape"] = [out_f, in_f]
        results["sweep"] = sweep_tiles(out_f, in_f, args.tokens, dtype, 0.01, repeats=args.repeats, device=device)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    print("\n".join(summarize(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
