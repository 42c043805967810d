"""SIFT on a bitsandbytes 4-bit base (CPU): the layer against a dequantized dense reference, calibration,
adapters (save, load, refusals, merged export) and import hygiene."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from sift_llm.errors import UserError  # noqa: E402
from sift_llm.loading import keep_4bit_layout, load_model, quantization_kwargs  # noqa: E402
from sift_llm.sift import SiftConfig, SiftLinear, attach_sift, load_adapter, save_adapter  # noqa: E402
from sift_llm.sift.quantized import SiftLinear4bit, dequantized_weight, merge_and_dequantize  # noqa: E402


def _linear4bit(out_features, in_features, *, bias, quant_type="nf4", double_quant=True, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias, compute_dtype=torch.float32,
                              compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on the move to a device


def _load_4bit(model_dir, quant_type="nf4", double_quant=True):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **quantization_kwargs(
        quant_type, double_quant, torch.float32, torch.uint8, torch.device("cpu")))
    keep_4bit_layout(model)
    return model


@pytest.mark.parametrize("quant_type, double_quant, bias", [("nf4", True, False), ("nf4", False, True),
                                                             ("fp4", True, True)])
@pytest.mark.parametrize("values_grad", ["dense", "sampled"])
def test_layer_matches_a_dequantized_dense_reference(quant_type, double_quant, bias, values_grad):
    """Output, input gradient and values' gradient equal those of x @ (dequant(W4) + S)^T + b in fp32."""
    layer = _linear4bit(96, 128, bias=bias, quant_type=quant_type, double_quant=double_quant)
    sift = SiftLinear4bit.convert(layer, "layer", 500, torch.float32, values_grad=values_grad)
    generator = torch.Generator().manual_seed(1)
    indices = torch.randperm(96 * 128, generator=generator)[:500].sort().values
    sift.set_selection(indices)
    with torch.no_grad():
        sift.values.copy_(torch.randn(500, generator=generator) * 0.05)

    effective = dequantized_weight(sift).clone()
    effective.view(-1)[indices] += sift.values.detach()
    effective.requires_grad_(True)
    x = torch.randn(3, 7, 128, generator=generator, requires_grad=True)
    grad = torch.randn(3, 7, 96, generator=generator)

    out = sift(x)
    reference = nn.functional.linear(x, effective, sift.bias)
    grad_x, grad_values = torch.autograd.grad(out, [x, sift.values], grad)
    ref_x, ref_w = torch.autograd.grad(reference, [x, effective], grad)

    scale = reference.abs().max()
    assert (out - reference).abs().max() <= 1e-5 * scale
    assert (grad_x - ref_x).abs().max() <= 1e-5 * ref_x.abs().max()
    assert (grad_values - ref_w.view(-1)[indices]).abs().max() <= 1e-5 * ref_w.abs().max()
    assert sift.weight.dtype == torch.uint8 and not sift.weight.requires_grad  # still the 4-bit weight


def test_no_dense_copy_outlives_a_call():
    """After forward and backward the layer holds its packed weight, the values, the indices and O(k)
    kernel state, but no (out x in) floating tensor."""
    sift = SiftLinear4bit.convert(_linear4bit(64, 96, bias=False), "layer", 200, torch.float32)
    sift.set_selection(torch.randperm(64 * 96)[:200].sort().values)
    x = torch.randn(4, 96, requires_grad=True)
    sift(x).square().sum().backward()
    assert sift.values.grad is not None and x.grad is not None

    def tensors(obj):
        if torch.is_tensor(obj):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
            yield from tensors(vars(obj))

    found = list(tensors(vars(sift)))
    assert found
    dense = [t for t in found if t.is_floating_point() and t.numel() >= 64 * 96]
    assert not dense, [tuple(t.shape) for t in dense]


def test_attach_converts_4bit_targets_and_calibration_matches_the_dequantized_model(tiny_model_dir):
    """The 4-bit model's selection equals (up to float-order ties) a full-precision model holding the
    dequantized weights; snip (which reads W) works by dequantizing one matrix at a time."""
    from transformers import AutoModelForCausalLM

    quantized = _load_4bit(tiny_model_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                dense.get_submodule(name).weight.copy_(dequantized_weight(module))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))

    chosen = {}
    for label, model in (("4bit", quantized), ("dense", dense)):
        handle = attach_sift(model, SiftConfig(density=0.05))
        selector = handle.selector()
        with selector.calibrating():
            model(input_ids=ids, labels=ids).loss.backward()
        selector.finalize()
        chosen[label] = {name: set(layer.indices.tolist()) for name, layer in handle.layers.items()}
        if label == "4bit":
            assert all(type(layer) is SiftLinear4bit for layer in handle.layers.values())
            assert handle.quantization["quant_type"] == "nf4" and handle.quantization["double_quant"] is True
    common = sum(len(chosen["4bit"][n] & chosen["dense"][n]) for n in chosen["dense"])
    total = sum(len(v) for v in chosen["dense"].values())
    assert common >= 0.98 * total

    snip = _load_4bit(tiny_model_dir)
    handle = attach_sift(snip, SiftConfig(density=0.05, metric="snip"))
    selector = handle.selector()
    with selector.calibrating():
        snip(input_ids=ids, labels=ids).loss.backward()
    assert selector.finalize().selected == sum(layer.k for layer in handle.layers.values())


def _trained_4bit_adapter(model_dir, out, steps=4):
    model = _load_4bit(model_dir)
    handle = attach_sift(model, SiftConfig(density=0.1))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    selector = handle.selector()
    with selector.calibrating():
        model(input_ids=ids, labels=ids).loss.backward()
    selector.finalize()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    save_adapter(handle, out)
    return ids, logits, losses


def test_adapter_round_trip_merged_export_and_refusals(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapter = tmp_path / "adapter"
    ids, trained, losses = _trained_4bit_adapter(tiny_model_dir, adapter)
    assert losses[-1] < losses[0]
    meta = json.loads((adapter / "sift_adapter.json").read_text())
    assert meta["base_model"]["quantization"]["quant_type"] == "nf4"
    assert meta["base_model"]["content"]["dtype"] == "torch.float32"  # the dequantized values were fingerprinted

    # The loader quantizes the base the same way and keeps the increment as a separate product: bit for bit.
    model, _, info = load_model(tiny_model_dir, adapter, device="cpu")
    assert any(isinstance(m, SiftLinear4bit) for m in model.modules())
    assert info["quantization"]["quant_type"] == "nf4" and "4-bit nf4 base" in info["scored"]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained)

    # Merged: dequantized base + increments as a plain HF directory.
    merged = merge_and_dequantize(model, torch.float32)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, SiftLinear)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - trained).abs().max() <= 1e-4

    # The wrong bases: full precision, another 4-bit format; and the merged model itself.
    with pytest.raises(UserError, match="trained on a 4-bit nf4 base.*full-precision base.*model.quantization=nf4"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), adapter)
    with pytest.raises(UserError, match="trained on a 4-bit nf4 base.*4-bit fp4 base"):
        load_adapter(_load_4bit(tiny_model_dir, quant_type="fp4"), adapter)
    with pytest.raises(UserError, match="double_quant=true"):
        load_adapter(_load_4bit(tiny_model_dir, double_quant=False), adapter)

    # A full-precision adapter on a 4-bit base.
    fp = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    handle = attach_sift(fp, SiftConfig(density=0.1))
    for layer in handle.layers.values():
        layer.set_selection(torch.arange(layer.k))
    save_adapter(handle, tmp_path / "fp-adapter")
    with pytest.raises(UserError, match="trained on a full-precision base.*4-bit nf4 base"):
        load_adapter(_load_4bit(tiny_model_dir), tmp_path / "fp-adapter")

    from sift_llm.sift.peft_export import export_peft

    with pytest.raises(UserError, match="4-bit nf4 base"):
        export_peft(adapter, tmp_path / "peft", base_model=tiny_model_dir)


def test_cpu_repacking_would_drop_the_input_gradient_and_is_kept_off():
    """bitsandbytes' CPU inference repacking (eval mode, no grad, AVX512-BF16) leaves later training forwards
    without an input gradient; keep_4bit_layout turns it off (the trainer and loader call it)."""
    model = nn.Sequential(_linear4bit(64, 128, bias=False))
    x = torch.randn(4, 128)
    keep_4bit_layout(model)
    model.eval()
    with torch.no_grad():
        model(x)
    assert not getattr(model[0].weight.quant_state, "packing_format_for_cpu", False)
    model.train()
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(model(x).sum(), x)
    assert grad.abs().sum() > 0


def test_importing_sift_imports_neither_bitsandbytes_nor_deepspeed():
    code = ("import sys, sift_llm.sift, sift_llm.sift.adapter, sift_llm.sift.model, sift_llm.loading; "
            "print(sorted(m for m in ('bitsandbytes', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_trainer_refuses_full_fine_tuning_and_castable_storage():
    from sift_llm.config import load_config
    from sift_llm.train.trainer import quantization_settings

    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="full fine-tuning cannot train a 4-bit base"):
        quantization_settings(load_config(None, ["model.quantization=nf4", "method.name=full"]), cpu, False, 2)
    with pytest.raises(UserError, match="quant_storage=float32.*bfloat16"):
        quantization_settings(load_config(None, ["model.quantization=nf4", "model.quant_storage=float32"]), cpu,
                              True, 2)
    with pytest.raises(UserError, match="under ZeRO-3.*must be float32"):
        quantization_settings(load_config(None, ["model.quantization=nf4", "model.quant_storage=uint8"]), cpu,
                              False, 3)
    settings = quantization_settings(load_config(None, ["model.quantization=fp4", "method.name=lora"]), cpu, False, 3)
    assert settings == {"quant_type": "fp4", "double_quant": True, "compute_dtype": torch.float32,
                        "quant_storage": torch.float32}
    assert quantization_settings(load_config(None, []), cpu, False, 2) is None
