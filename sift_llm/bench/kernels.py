"""The SIFT layer's kernels on one matrix: the values' gradient by dense row blocks vs the sampled product,
and one training pass (forward + backward) with the previous kernels vs the current ones, per density.

This is where :data:`sift_llm.sift.layer.SAMPLED_MAX_DENSITY` comes from: the density below which the
sampled product is faster on this device.
"""

from __future__ import annotations

import torch
from torch import nn

from sift_llm.bench.common import median, timed
from sift_llm.bench.config import KernelsConfig
from sift_llm.runtime import default_device
from sift_llm.sift import SiftLinear
from sift_llm.sift.layer import sampled_weight_grad, sddmm_values_grad


def _best(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    return median(timed(fn, device) for _ in range(repeats))


def run_kernels(cfg: KernelsConfig) -> dict:
    device = default_device()
    dtype = getattr(torch, cfg.dtype)
    out_f, in_f, tokens = cfg.out_features, cfg.in_features, cfg.tokens
    generator = torch.Generator(device="cpu").manual_seed(0)
    grad = torch.randn(tokens, out_f, generator=generator).to(device, dtype)
    x = torch.randn(tokens, in_f, generator=generator).to(device, dtype)
    frozen = nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype).requires_grad_(False)
    x_train = x.detach().clone().requires_grad_(True)

    def frozen_pass():
        x_train.grad = None
        (frozen(x_train) * grad).sum().backward()

    rows = []
    frozen_s = _best(frozen_pass, device, cfg.repeats)
    for density in cfg.densities:
        k = max(1, round(density * out_f * in_f))
        layer = SiftLinear.convert(nn.Linear(in_f, out_f, bias=False, device=device, dtype=dtype), "kernel", k, torch.float32)
        layer.set_selection(torch.randperm(out_f * in_f, generator=generator)[:k].sort().values.to(device))
        indices = layer.indices
        dense_s = _best(lambda: sampled_weight_grad(grad, x, indices, layer.row_blocks()), device, cfg.repeats)
        sampled_s = _best(lambda: sddmm_values_grad(grad, x, indices, in_f), device, cfg.repeats)

        def train_pass():
            layer.values.grad = None
            x_train.grad = None
            (layer(x_train) * grad).sum().backward()

        layer.merge, layer.values_grad = "clone", "dense"
        before_s = _best(train_pass, device, cfg.repeats)
        layer.merge, layer.values_grad = "patch", "auto"
        after_s = _best(train_pass, device, cfg.repeats)
        rows.append({"density": density, "k": k, "dense_dw_s": dense_s, "sampled_dw_s": sampled_s,
                     "pass_before_s": before_s, "pass_after_s": after_s, "pass_frozen_s": frozen_s})
        del layer
    wins = [row["density"] for row in rows if row["sampled_dw_s"] < row["dense_dw_s"]]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "device_type": device.type, "shape": [out_f, in_f], "tokens": tokens, "dtype": cfg.dtype,
            "threads": torch.get_num_threads(), "sampled_wins_up_to": max(wins) if wins else None, "rows": rows}
