"""Trainable-state bytes as DeepSpeed actually holds them, per method, in a 1-rank engine.

Run as ``python -m sift_llm.bench.probe REQUEST_JSON OUT_JSON`` (the cost bench does). For each variant the
model is prepared exactly as the trainer prepares it (method, selection, optimizer groups, DeepSpeed config),
one step is taken, and the bytes of every distinct tensor that persists between steps are summed: the
trainable parameters, DeepSpeed's fp32 master partitions, the optimizer's moments, and SIFT's indices.
Gradients are transient (backward to step) and reported apart.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch


def _storage_bytes(tensors, seen: set) -> int:
    total = 0
    for tensor in tensors:
        if tensor is None or not torch.is_tensor(tensor) or tensor.numel() == 0:
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def measure(engine, optimizer, model, handle) -> dict:
    """Bytes of trainable parameters, master copies, optimizer moments, indices, and (transient) gradients."""
    seen: set = set()
    trainable = [p for p in model.parameters() if p.requires_grad]
    params = _storage_bytes(trainable, seen)
    masters = _storage_bytes(getattr(optimizer, "single_partition_of_fp32_groups", None) or [], seen)
    inner = getattr(optimizer, "optimizer", optimizer)
    moments = _storage_bytes(
        [t for state in inner.state.values() for t in state.values() if torch.is_tensor(t) and t.dim() > 0], seen
    )
    indices = 0
    if handle is not None:
        indices = _storage_bytes([layer.indices for layer in handle.layers.values()], seen)
    grads = _storage_bytes([p.grad for p in trainable], set())
    grads += _storage_bytes([getattr(m, "grad", None) for m in getattr(optimizer, "single_partition_of_fp32_groups", [])], set())
    return {"trainable": sum(p.numel() for p in trainable), "param_bytes": params, "master_bytes": masters, "optimizer_bytes": moments, "index_bytes": indices,
            "state_bytes": params + masters + moments + indices, "persistent_grad_bytes": grads}


def probe_variant(model_dir: str, ds_path: str, variant: dict) -> dict:
    import deepspeed

    from sift_llm.bench.runs import method_section
    from sift_llm.config import ExperimentConfig
    from sift_llm.loading import load_for_training
    from sift_llm.schema import build
    from sift_llm.train.ds_config import build_ds_config
    from sift_llm.train.methods import build_method
    from sift_llm.train.trainer import build_optimizer

    cfg = build(ExperimentConfig, {"model": {"path": model_dir}, "method": method_section(variant),
                                   "train": {"micro_batch_size": 1, "learning_rate": 1e-5},
                                   "deepspeed": {"config": ds_path}})
    device = torch.device("cpu") if not torch.cuda.is_available() else torch.device("cuda", 0)
    model = load_for_training(model_dir, dtype=torch.float32, gradient_checkpointing=False).to(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=generator).to(device)
    batch = {"input_ids": ids, "labels": ids}
    method = build_method(cfg)
    model = method.prepare(model)
    if method.selects:
        method.select(model, [([batch], int(ids[:, 1:].numel()))], micro_batches=1)
    bf16 = device.type != "cpu"
    ds = build_ds_config(cfg, bf16=bf16, world_size=1)
    optimizer = build_optimizer(cfg, method.parameter_groups(model, 0.0), device, ds)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    for _ in range(2):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    handle = getattr(method, "handle", None)
    row = {"label": variant["label"], **measure(engine, optimizer, model, handle)}
    row["state_bytes_per_trainable"] = row["state_bytes"] / row["trainable"]
    row["index_bytes_per_trainable"] = row["index_bytes"] / row["trainable"]
    del engine, optimizer, model, method
    gc.collect()
    return row


def main(argv: list[str]) -> int:
    from sift_llm.train.trainer import end_process, init_distributed

    request, out = json.loads(argv[0]), Path(argv[1])
    init_distributed()
    rows = [probe_variant(request["model_dir"], request["deepspeed_config"], v) for v in request["variants"]]
    out.write_text(json.dumps({"deepspeed_config": request["deepspeed_config"], "rows": rows}, indent=2))
    end_process(0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
