"""Two-rank DeepSpeed check of SIFT, launched by test_deepspeed.py with torch.distributed.run.

Each rank gets different data. For every requested setup the ranks select through the SIFT selector
(gradients all-reduced), train a few steps in a DeepSpeed engine, and rank 0 writes what it found:
whether indices and values agree across ranks, and the deviation from a plain-PyTorch single-process run
on the concatenated data (computed by every rank before torch.distributed starts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiny  # noqa: E402

from sift_llm.sift import SiftConfig, attach_sift  # noqa: E402

VOCAB, BATCH, SEQ, STEPS, WORLD = 96, 2, 12, 3, 2
CONFIGS = {"per_matrix": SiftConfig(density=0.05), "global": SiftConfig(density=0.05, scope="global")}


def rank_batches(rank: int) -> list[torch.Tensor]:
    """Calibration batch then STEPS training batches of one rank; identical on every process."""
    generator = torch.Generator().manual_seed(1234)
    every = torch.randint(0, VOCAB, (STEPS + 1, WORLD, BATCH, SEQ), generator=generator)
    return list(every[:, rank])


def concatenated_batches() -> list[torch.Tensor]:
    return [torch.cat(parts) for parts in zip(*(rank_batches(r) for r in range(WORLD)), strict=True)]


def select(handle, model, batch: torch.Tensor) -> None:
    """One calibration batch through plain autograd on the bare module (see the README of deepspeed_run)."""
    selector = handle.selector()
    with selector.calibrating():
        model(input_ids=batch, labels=batch).loss.backward()
    selector.finalize()


def reference_run(scope: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Plain PyTorch, one process, the concatenation of both ranks' batches (equal token counts)."""
    model = tiny.build_model(VOCAB)
    handle = attach_sift(model, CONFIGS[scope])
    calibration, *steps = concatenated_batches()
    select(handle, model, calibration)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    for batch in steps:
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return _snapshot(handle)


def _snapshot(handle) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    indices = {name: layer.indices.detach().cpu().long().clone() for name, layer in handle.layers.items()}
    values = {name: layer.values.detach().cpu().float().clone() for name, layer in handle.layers.items()}
    return indices, values


def deepspeed_run(stage: int, bf16: bool, scope: str, rank: int):
    """Select, train STEPS steps in a DeepSpeed engine, return this rank's (gathered) indices and values.

    Calibration runs the bare module with plain ``loss.backward()``: ``engine.backward`` fails at ZeRO 1/2
    when no parameter gets a gradient, and the engine's forward refuses a plain backward at ZeRO 0.
    Per-matrix scope selects after the engine exists; global scope must select before it is built.
    """
    import deepspeed

    model = tiny.build_model(VOCAB)
    handle = attach_sift(model, CONFIGS[scope])
    calibration, *steps = rank_batches(rank)
    if scope == "global":
        select(handle, model, calibration)
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.0)
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even these tiny parameters
    ds_config = {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if scope == "per_matrix":
        select(handle, engine.module, calibration)
    for batch in steps:
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
    values = [layer.values for layer in handle.layers.values()]
    gather = deepspeed.zero.GatheredParameters(values) if stage == 3 else contextlib.nullcontext()
    with gather:
        snapshot = _snapshot(handle)
    engine.destroy()
    return snapshot


def _common(indices, values, ref_indices, ref_values) -> torch.Tensor:
    """values - ref_values over the positions both selected (all of them when the selections agree)."""
    return values[torch.isin(indices, ref_indices)] - ref_values[torch.isin(ref_indices, indices)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--setups", default="0,1,2,3", help="comma list of ZeRO stages; suffix b: bf16, g: global scope"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    references = {scope: reference_run(scope) for scope in CONFIGS}

    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    results = {}
    for setup in args.setups.split(","):
        stage, bf16, scope = int(setup[0]), "b" in setup, "global" if "g" in setup else "per_matrix"
        indices, values = deepspeed_run(stage, bf16, scope, rank)
        ref_indices, ref_values = references[scope]
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, (indices, values))
        (indices0, values0), (indices1, values1) = gathered
        deviation = torch.cat([_common(indices0[n], values0[n], ref_indices[n], ref_values[n]) for n in values0])
        reference = torch.cat(list(ref_values.values()))
        results[setup] = {
            "stage": stage,
            "bf16": bf16,
            "scope": scope,
            "indices_equal_across_ranks": all(torch.equal(indices0[n], indices1[n]) for n in indices0),
            "values_equal_across_ranks": all(torch.equal(values0[n], values1[n]) for n in values0),
            "indices_equal_reference": all(torch.equal(indices0[n], ref_indices[n]) for n in indices0),
            "max_abs_deviation": float(deviation.abs().max()),
            "mean_abs_deviation": float(deviation.abs().mean()),
            "max_abs_value": float(reference.abs().max()),
            "mean_abs_value": float(reference.abs().mean()),
            "all_values_finite": all(bool(torch.isfinite(values0[n]).all()) for n in values0),
            "matrices_trained": sum(bool(values0[n].ne(0).any()) for n in values0),
            "matrices_selected": sum(values0[n].numel() > 0 for n in values0),
            "index_overlap_with_reference": sum(
                int(torch.isin(indices0[n], ref_indices[n]).sum()) for n in indices0
            )
            / max(1, sum(ref_indices[n].numel() for n in ref_indices)),
        }
    if rank == 0:
        Path(args.out).write_text(json.dumps(results, indent=2))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
