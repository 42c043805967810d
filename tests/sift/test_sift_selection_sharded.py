"""The sharded selection (reduce to slices, per-rank candidates, exact merge) chooses exactly what one process
chooses on the summed gradient: 2 and 3 gloo ranks, matrices large enough for the sampled candidate threshold,
integer gradients full of ties, an all-zero gradient, a matrix smaller than the world, and every metric."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sift_llm import schema
from sift_llm.runtime import free_port
from sift_llm.sift import SiftConfig, attach_sift
from sift_llm.sift.selection import top_k_candidates, top_k_positions, weight_gradient

# (out, in) per target: large (sampled threshold at 1% and 5%), small, one smaller than 3 ranks' slices.
SHAPES = {"big_proj": (384, 512), "wide_proj": (256, 640), "small_proj": (8, 12), "tiny_proj": (1, 2)}
TOKENS = 6


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (out, inp) in SHAPES.items():
            setattr(self, name, nn.Linear(inp, out, bias=False))


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return Stack()


def _inputs(rank: int, name: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_out, inputs) of one rank for one matrix; ``ints``: small integers, so products and sums are exact."""
    out, inp = SHAPES[name]
    generator = torch.Generator().manual_seed(1000 * rank + sum(map(ord, name)) + len(kind))
    if kind == "ints":
        g = torch.randint(-2, 3, (TOKENS, out), generator=generator).float()
        x = torch.randint(-2, 3, (TOKENS, inp), generator=generator).float()
    else:
        g = torch.randn(TOKENS, out, generator=generator) * torch.rand(TOKENS, 1, generator=generator)
        x = torch.randn(TOKENS, inp, generator=generator)
    if name == "wide_proj" and kind == "zeros":
        g = torch.zeros_like(g)
    return g, x


def _reference(world: int, config: SiftConfig, kind: str) -> dict[str, list[int]]:
    """One process: the summed gradient (added in rank order, as the slices are), scored, exact top-k per matrix."""
    model = _model()
    handle = attach_sift(model, config)
    out = {}
    for name, layer in handle.layers.items():
        grads = [weight_gradient(*_inputs(r, name, kind)) for r in range(world)]
        total = grads[0] + grads[1] if world == 2 else torch.stack(grads).sum(0)
        weight = layer.weight.detach().reshape(-1)
        score = {"grad_abs": total.abs(), "fisher": total.square(), "snip": (weight * total).abs(),
                 "weight_abs": weight.abs()}[config.metric]
        out[name] = top_k_positions(score, layer.k).tolist()
    return out


def _worker(rank: int, world: int, port: int, cases: list, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for raw, kind in cases:
        config = schema.build(SiftConfig, raw)
        model = _model()
        handle = attach_sift(model, config)
        selector = handle.selector()
        for name, layer in reversed(list(handle.layers.items())):  # backward order
            grad_out, inputs = _inputs(rank, name, kind)
            selector.observe(layer, grad_out, inputs, layer.weight)
        report = selector.finalize()
        results.append({name: layer.indices.long().tolist() for name, layer in handle.layers.items()})
        results[-1]["_selected"] = report.selected
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


CASES = [
    ({"density": 0.01, "targets": list(SHAPES)}, "floats"),
    ({"density": 0.05, "targets": list(SHAPES)}, "floats"),
    ({"density": 0.05, "targets": list(SHAPES)}, "ints"),
    ({"density": 0.3, "targets": list(SHAPES)}, "ints"),
    ({"density": 0.02, "targets": list(SHAPES)}, "zeros"),
    ({"density": 1.0, "targets": list(SHAPES)}, "floats"),
    ({"density": 0.05, "targets": list(SHAPES), "metric": "fisher"}, "ints"),
    ({"density": 0.05, "targets": list(SHAPES), "metric": "snip"}, "floats"),
    ({"density": 0.01, "targets": list(SHAPES), "metric": "weight_abs"}, "floats"),
]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_sharded_selection_equals_one_process(tmp_path, world):
    out = tmp_path / "results.json"
    mp.start_processes(_worker, args=(world, free_port(), CASES, str(out)), nprocs=world, start_method="spawn")
    results = json.loads(out.read_text())
    for (raw, kind), result in zip(CASES, results, strict=True):
        config = schema.build(SiftConfig, raw)
        expected = _reference(world, config, kind)
        for name, indices in expected.items():
            assert result[name] == indices, (raw, kind, name)


def test_single_process_observe_equals_reference():
    for raw, kind in CASES:
        config = schema.build(SiftConfig, raw)
        model = _model()
        handle = attach_sift(model, config)
        selector = handle.selector()
        for name, layer in handle.layers.items():
            selector.observe(layer, *_inputs(0, name, kind), layer.weight)
        selector.finalize()
        expected = _reference(1, config, kind)
        for name, layer in handle.layers.items():
            assert layer.indices.long().tolist() == expected[name], (raw, kind, name)


@pytest.mark.parametrize("k", [0, 1, 7, 300, 2500, 9000, 20000, 20480])
@pytest.mark.parametrize("kind", ["floats", "ints", "constant"])
def test_top_k_candidates_contract(k, kind):
    generator = torch.Generator().manual_seed(k)
    n = 20480
    scores = {"floats": torch.rand(n, generator=generator) ** 4,
              "ints": torch.randint(0, 5, (n,), generator=generator).float(),
              "constant": torch.full((n,), 0.5)}[kind]
    positions, floor = top_k_candidates(scores, k)
    assert torch.equal(positions, positions.sort().values) and positions.unique().numel() == positions.numel()
    chosen = scores[positions]
    if k >= n:
        assert positions.numel() == n and floor == float("-inf")
        return
    if k == 0:
        assert positions.numel() == 0
        return
    # everything above the floor is in; ties at the floor are a lowest-position prefix; at least k are >= floor
    assert int((scores > floor).sum()) == int((chosen > floor).sum())
    tied = torch.nonzero(scores == floor).squeeze(1)
    tied_in = positions[chosen == floor]
    assert torch.equal(tied_in, tied[: tied_in.numel()])
    assert int((chosen >= floor).sum()) >= k
    assert set(top_k_positions(scores, k).tolist()) <= set(positions.tolist())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
