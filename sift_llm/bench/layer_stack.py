"""A stack of LLaMA decoder layers trained in plain PyTorch: LLaMA-7B shapes on one GPU, no DeepSpeed.

Each method gets a fresh stack (random init, same seed) and runs the same steps on the same random
hidden states: SIFT (selection on the first batch, then training), LoRA at SIFT's parameter count, full
fine-tuning. Every method trains through :class:`~sift_llm.bench.common.MasterAdamW`. Measured: peak
device memory (CUDA max allocated, or peak RSS on CPU) over the training steps, median step time,
tokens/s, trainable-state bytes, and the selection pass's time and peak memory. SIFT rows also record
which values'-gradient path the cost rule took in each layer (``values_grad_paths``) and the Triton tile
plans' load ratio and bytes (held during the steps, so inside the peak); ``forced_paths`` adds SIFT rows that
force one path (dense, sampled, or triton on CUDA).
"""

from __future__ import annotations

import gc
from collections import Counter

import torch
from torch import nn

from sift_llm.bench.common import (
    MasterAdamW,
    lora_count,
    matching_lora_rank,
    median,
    sift_count,
    target_shapes,
    timed,
)
from sift_llm.bench.config import LayerStackConfig
from sift_llm.runtime import default_device, log
from sift_llm.train.metrics import peak_memory, reset_peak_memory


class DecoderStack(nn.Module):
    """``layers`` LlamaDecoderLayers with rotary embeddings and a causal mask; loss = mean square of the output."""

    def __init__(self, cfg: LayerStackConfig, dtype: torch.dtype):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = LlamaConfig(
            hidden_size=cfg.hidden, intermediate_size=cfg.intermediate, num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.heads, num_hidden_layers=cfg.layers, max_position_embeddings=max(cfg.seq, 2048),
        )
        config._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(cfg.layers))
        self.rotary = LlamaRotaryEmbedding(config)
        self.to(dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        embeddings = self.rotary(hidden, positions)
        for layer in self.layers:
            out = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden.float().square().mean()


def _device_peak(device: torch.device) -> int:
    peak = peak_memory(device)
    return peak.get("cuda_max_allocated_bytes", peak["rss_peak_bytes"])


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_variant(cfg: LayerStackConfig, variant: dict, device: torch.device) -> dict:
    """Build, prepare and train one method; return its measured row."""
    from sift_llm.sift import SiftConfig, attach_sift

    dtype = getattr(torch, cfg.dtype)
    _free(device)
    torch.manual_seed(cfg.seed)
    stack = DecoderStack(cfg, dtype).to(device)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed + 1)
    batches = [
        torch.randn(cfg.batch, cfg.seq, cfg.hidden, generator=generator).to(device, dtype)
        for _ in range(1 + cfg.warmup_steps + cfg.timed_steps)
    ]
    row: dict = {"label": variant["label"], "method": variant["method"]}
    method = variant["method"]
    if method == "sift":
        stack.requires_grad_(False)
        config = SiftConfig(density=variant["density"], merge=variant.get("merge", "patch"),
                            values_grad=variant.get("values_grad", "auto"))
        handle = attach_sift(stack, config)
        reset_peak_memory(device)
        before = _device_peak(device)
        selector = handle.selector()

        def select():
            with selector.calibrating():
                stack(batches[0]).backward()
            selector.finalize()

        row["selection_s"] = timed(select, device)
        row["selection_peak_bytes"] = _device_peak(device)
        row["selection_start_bytes"] = before
        row.update(kernel_choices(handle, device, dtype))
        params = handle.trainable_parameters()
        row["trainable"] = sum(layer.k for layer in handle.layers.values())
        row["index_bytes"] = sum(layer.indices.numel() * layer.indices.element_size() for layer in handle.layers.values())
    elif method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        stack.requires_grad_(False)
        inject_adapter_in_model(LoraConfig(r=variant["r"], lora_alpha=2 * variant["r"], target_modules=variant["targets"]), stack)
        params = [p for p in stack.parameters() if p.requires_grad]
        row["trainable"] = sum(p.numel() for p in params)
        row["index_bytes"] = 0
    else:
        stack.requires_grad_(True)
        params = list(stack.parameters())
        row["trainable"] = sum(p.numel() for p in params)
        row["index_bytes"] = 0
    optimizer = MasterAdamW(params, lr=1e-5)

    def step(hidden):
        def run():
            stack(hidden).backward()
            optimizer.step()
            optimizer.zero_grad()
        return run

    reset_peak_memory(device)
    times = [timed(step(hidden), device) for hidden in batches[1:]]
    row["peak_bytes"] = _device_peak(device)
    timed_times = times[cfg.warmup_steps:]
    row["step_time_s"] = median(timed_times)
    row["step_times_s"] = timed_times
    row["tokens_per_s"] = cfg.batch * cfg.seq / row["step_time_s"]
    row["state_bytes"] = optimizer.state_bytes() + row["index_bytes"]
    row["weights_bytes"] = sum(p.numel() * p.element_size() for p in stack.parameters())
    del optimizer, stack, batches, params
    _free(device)
    return row


def kernel_choices(handle, device: torch.device, dtype: torch.dtype) -> dict:
    """Which values'-gradient path each SIFT layer takes (the cost rule's choice for "auto"), the Triton tile
    plans' load ratios (the kernel's traffic per weight entry) and their bytes, built here before the steps."""
    from sift_llm.sift.layer import values_grad_path

    paths: Counter[str] = Counter()
    ratios, plan_bytes = [], 0
    for layer in handle.layers.values():
        path = values_grad_path(layer.numel_weight, layer.k, device, layer.values_grad, dtype, layer.load_ratio)
        paths[path] += 1
        if path == "triton":
            ratios.append(layer.load_ratio())
            plan_bytes += layer.tile_plan().nbytes
    return {"values_grad_paths": dict(paths), "triton_load_ratio": median(ratios), "triton_plan_bytes": plan_bytes}


def variants(cfg: LayerStackConfig) -> tuple[list[dict], dict]:
    """The methods to run, in order, and facts about the matching (shapes, counts, LoRA rank)."""
    with torch.device("meta"):
        shapes = target_shapes(DecoderStack(cfg, torch.float32))
    r = matching_lora_rank(shapes, cfg.lora_match_density)
    out = [{"label": f"sift-{d * 100:g}%", "method": "sift", "density": d} for d in cfg.sift_densities]
    match = f"sift-{cfg.lora_match_density * 100:g}%"
    # forced paths: "dense", "sampled" or "triton" (the last needs CUDA and triton)
    for path in cfg.forced_paths:
        out.append({"label": f"{match} ({path} dW)", "method": "sift", "density": cfg.lora_match_density, "values_grad": path})
    if cfg.before_kernels:
        out.append({"label": f"{match} (before: copy + dense dW)", "method": "sift", "density": cfg.lora_match_density,
                    "merge": "clone", "values_grad": "dense", "before": True})
    out.append({"label": f"lora-r{r}", "method": "lora", "r": r, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})
    if cfg.full:
        out.append({"label": "full", "method": "full"})
    facts = {
        "targeted_entries": sum(o * i for o, i in shapes),
        "sift_counts": {f"{d * 100:g}%": sift_count(shapes, d) for d in cfg.sift_densities},
        "lora_rank": r,
        "lora_count": lora_count(shapes, r),
        "lora_match_density": cfg.lora_match_density,
    }
    return out, facts


def combine_rounds(rows: list[dict]) -> dict:
    """One row from the same variant's rounds: pooled step-time median, worst peak, median selection time."""
    first = dict(rows[0])
    times = [t for row in rows for t in row["step_times_s"]]
    first["step_times_s"] = times
    first["step_time_s"] = median(times)
    first["round_step_time_s"] = [row["step_time_s"] for row in rows]
    first["tokens_per_s"] = first["tokens_per_s"] * rows[0]["step_time_s"] / first["step_time_s"]
    first["peak_bytes"] = max(row["peak_bytes"] for row in rows)
    if "selection_s" in first:
        first["selection_s"] = median(row["selection_s"] for row in rows)
        first["round_selection_s"] = [row["selection_s"] for row in rows]
        first["selection_peak_bytes"] = max(row["selection_peak_bytes"] for row in rows)
    return first


def run_layer_stack(cfg: LayerStackConfig) -> dict:
    device = default_device()
    plan, facts = variants(cfg)
    by_label: dict[str, list[dict]] = {variant["label"]: [] for variant in plan}
    for round_index in range(cfg.rounds):
        for variant in plan:
            log(f"layer stack, round {round_index + 1}/{cfg.rounds}: {variant['label']}")
            row = run_variant(cfg, variant, device)
            row["before"] = bool(variant.get("before"))
            by_label[variant["label"]].append(row)
            log(f"  step {row['step_time_s'] * 1e3:.1f} ms, peak {row['peak_bytes'] / 2**30:.2f} GiB")
    rows = [combine_rounds(by_label[variant["label"]]) for variant in plan]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "device_type": device.type, "torch": torch.__version__,
            "shape": {k: getattr(cfg, k) for k in ("hidden", "intermediate", "heads", "layers", "seq", "batch", "dtype")},
            "warmup_steps": cfg.warmup_steps, "timed_steps": cfg.timed_steps, "rounds": cfg.rounds, **facts,
            "rows": rows}
