"""The sparse-increment kernels: the tile plan's addressing (pure torch, always run) and the Triton kernels
against float64 references, on a GPU when there is one and through Triton's CPU interpreter otherwise
(skipped when triton is not installed; CPU torch does not ship it: ``pip install triton``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sift_llm.sift import SiftLinear, kernels
from sift_llm.sift.kernels.plan import build_tile_plan, transposed_pattern, unpack
from sift_llm.sift.layer import merged_weight

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")


def random_indices(out_features: int, in_features: int, k: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(out_features * in_features, generator=generator)[:k].sort().values.to(torch.int32)


def plan_entries(plan) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row, column, position in values) of every set mask bit, by the kernels' own addressing rule:
    position = tile_pos[tile, i] + (bits of row i set earlier in the tile)."""
    cols, masks = unpack(plan)
    br = plan.group_rows
    lengths = (plan.tile_end - plan.tile_start).long()
    slot_tile = torch.repeat_interleave(torch.arange(plan.tiles), lengths)
    i = torch.arange(br)
    bits = (masks[:, None] >> i[None, :]) & 1
    running = bits.cumsum(0)
    start = plan.tile_start.long()[slot_tile]
    before = torch.where((start > 0)[:, None], running[(start - 1).clamp(min=0)], torch.zeros_like(running))
    pos = plan.tile_pos.long().view(plan.tiles, br)[slot_tile] + running - bits - before
    rows = plan.tile_group.long()[slot_tile][:, None] * br + i[None, :]
    chosen = bits.bool()
    return rows[chosen], cols[:, None].expand_as(rows)[chosen], pos[chosen]


PLAN_CASES = [
    # out, in, k, group rows, tile columns
    (80, 96, 300, 16, 16),
    (80, 96, 300, 16, 128),
    (70, 50, 3500, 16, 32),  # full density
    (100, 40, 500, 32, 16),
    (130, 37, 1200, 64, 16),
    (33, 40_000, 900, 16, 64),  # too wide to pack column and mask into one int32
    (5, 7, 1, 16, 16),
]


@pytest.mark.parametrize(("out_features", "in_features", "k", "group_rows", "tile_cols"), PLAN_CASES)
def test_plan_addresses_every_entry_exactly_once(out_features, in_features, k, group_rows, tile_cols):
    indices = random_indices(out_features, in_features, k, seed=out_features)
    plan = build_tile_plan(indices, out_features, in_features, group_rows, tile_cols)
    assert plan.packed == (group_rows == 16 and in_features < 2**15)
    # union slots are covered by the tiles in order, each tile within one group and at most tile_cols wide
    assert plan.tile_start[0] == 0 and plan.tile_end[-1] == plan.union_size
    assert torch.equal(plan.tile_start[1:], plan.tile_end[:-1])
    assert int((plan.tile_end - plan.tile_start).max()) <= tile_cols
    counts = torch.bincount(plan.tile_group.long(), minlength=plan.groups)
    assert torch.equal(plan.group_tiles.diff().long(), counts)
    rows, cols, pos = plan_entries(plan)
    assert torch.equal(pos.sort().values, torch.arange(k))
    assert torch.equal(rows * in_features + cols, indices.long()[pos])
    # within a group, the union columns are sorted and distinct
    union_cols, _ = unpack(plan)
    slot_group = torch.repeat_interleave(plan.tile_group.long(), (plan.tile_end - plan.tile_start).long())
    keys = slot_group * in_features + union_cols
    assert bool((keys[1:] > keys[:-1]).all())


def test_plan_union_size_follows_the_pattern():
    out_features, in_features, k = 256, 512, 1310  # 1%
    rng = random_indices(out_features, in_features, k)
    random_plan = build_tile_plan(rng, out_features, in_features)
    # ~1 - (1 - d)^16 of the columns per 16-row group for a uniform pattern
    expected = (out_features / 16) * in_features * (1 - (1 - k / (out_features * in_features)) ** 16)
    assert abs(random_plan.union_size - expected) < 0.05 * expected
    # the same count of entries on 8 shared columns: one union column per group and column
    rows = torch.arange(out_features).repeat_interleave(5)
    cols = torch.tensor([3, 50, 99, 200, 511]).repeat(out_features)
    clustered = build_tile_plan((rows * in_features + cols).to(torch.int32), out_features, in_features)
    assert clustered.union_size == (out_features // 16) * 5
    assert clustered.load_ratio() < random_plan.load_ratio() / 4
    assert random_plan.nbytes < 3 * 4 * k  # a few bytes per entry, not per weight


def test_plan_of_an_empty_selection_and_the_transposed_pattern():
    plan = build_tile_plan(torch.zeros(0, dtype=torch.int32), 40, 30)
    assert plan.tiles == 0 and plan.union_size == 0 and plan.groups == 3
    indices = random_indices(9, 13, 40)
    transposed, perm = transposed_pattern(indices, 9, 13)
    dense = torch.zeros(9 * 13, dtype=torch.long)
    dense[indices.long()] = torch.arange(1, 41)
    assert torch.equal(dense.view(9, 13).t().reshape(-1)[transposed.long()], torch.arange(1, 41)[perm])
    with pytest.raises(ValueError, match="group_rows"):
        build_tile_plan(indices, 9, 13, group_rows=8)


# --- the Triton kernels -------------------------------------------------------------------------------------

needs_triton = pytest.mark.skipif(not kernels.triton_importable(), reason="triton is not installed")


@pytest.fixture(scope="module")
def ops():
    """The Triton kernels: compiled on a GPU, else through the interpreter when this process started with
    TRITON_INTERPRET=1 (triton must be imported in interpreter mode; see test_kernels_through_the_interpreter)."""
    if not CUDA and not kernels.triton_interpret():
        pytest.skip("no GPU: these run in the TRITON_INTERPRET=1 subprocess")
    module = kernels.load_triton_ops()
    if not CUDA and not module.interpreting():
        pytest.skip("triton was imported before TRITON_INTERPRET was set")
    return module


@needs_triton
@pytest.mark.skipif(CUDA or kernels.triton_interpret(), reason="the kernels run in this process")
def test_kernels_through_the_interpreter():
    # Triton reads TRITON_INTERPRET when it is first imported, and this process imported it already (through
    # transformers and torch._dynamo), so the kernel tests of this file run in a child process that sets it.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not interpreter"]
    result = subprocess.run(command, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True,
                            timeout=900)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "skipped" in summary, summary  # the kernel tests ran; the GPU-only ones skipped


# Small enough for the interpreter (a few hundred programs), with ragged token and row counts.
KERNEL_CASES = [
    # out, in, tokens, k, group rows, tile columns
    (80, 96, 37, 300, 16, 16),
    (70, 50, 33, 900, 16, 32),
    (100, 40, 20, 500, 32, 16),
    (130, 37, 17, 1200, 64, 16),
    (33, 40_000, 18, 400, 16, 16),
]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}


def block_t() -> int:
    return 64 if CUDA else 16  # several token blocks and a ragged last one in the interpreter


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("out_features", "in_features", "tokens", "k", "group_rows", "tile_cols"), KERNEL_CASES)
def test_values_grad_kernel_matches_float64(ops, dtype, out_features, in_features, tokens, k, group_rows, tile_cols):
    indices = random_indices(out_features, in_features, k, seed=k).to(DEVICE)
    plan = build_tile_plan(indices, out_features, in_features, group_rows, tile_cols)
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(tokens, out_features, generator=generator).to(DEVICE, dtype)
    x = torch.randn(tokens, in_features, generator=generator).to(DEVICE, dtype)
    expected = (grad.double().t() @ x.double()).view(-1)[indices.long()]
    result = ops.values_grad(grad, x, plan, block_t=block_t())
    assert result.dtype == torch.float32 and result.shape == (k,)
    # products of bf16/fp16 inputs are exact in fp32, so only the fp32 accumulation rounds
    torch.testing.assert_close(result.double(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype] * tokens ** 0.5)


@needs_triton
def test_values_grad_kernel_takes_strided_gradients(ops):
    out_features, in_features, tokens = 48, 40, 21
    indices = random_indices(out_features, in_features, 200).to(DEVICE)
    plan = build_tile_plan(indices, out_features, in_features)
    wide = torch.randn(tokens, 2 * out_features, device=DEVICE)
    grad = wide[:, ::2]  # a non-contiguous (tokens, out) view
    x = torch.randn(tokens, in_features, device=DEVICE)
    expected = (grad.double().t() @ x.double()).view(-1)[indices.long()]
    torch.testing.assert_close(ops.values_grad(grad, x, plan, block_t=block_t()).double(), expected,
                               rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("out_features", "in_features", "tokens", "k", "group_rows", "tile_cols"), KERNEL_CASES[:4])
def test_increment_kernel_matches_float64(ops, dtype, out_features, in_features, tokens, k, group_rows, tile_cols):
    indices = random_indices(out_features, in_features, k, seed=k).to(DEVICE)
    plan = build_tile_plan(indices, out_features, in_features, group_rows, tile_cols)
    generator = torch.Generator().manual_seed(2)
    values = torch.randn(k, generator=generator).to(DEVICE)
    x = torch.randn(tokens, in_features, generator=generator).to(DEVICE, dtype)
    base = torch.randn(tokens, out_features, generator=generator).to(DEVICE, dtype)
    dense = torch.zeros(out_features * in_features, dtype=torch.float64, device=DEVICE)
    dense[indices.long()] = values.to(dtype).double()  # the kernel multiplies the values in x's dtype
    expected = x.double() @ dense.view(out_features, in_features).t()
    product = ops.increment_matmul(x, plan, values, block_t=block_t())
    accumulated = base.clone()
    ops.increment_matmul(x, plan, values, accumulated, block_t=block_t())
    assert product.dtype == dtype
    eps = torch.finfo(dtype).eps
    scale = expected.abs().max().item() + 1
    torch.testing.assert_close(product.double(), expected, rtol=2 * eps, atol=2 * eps * scale)
    torch.testing.assert_close(accumulated.double(), base.double() + expected, rtol=2 * eps, atol=4 * eps * scale)


def _compile_ahead(ops, kernel: str, arch: int, dtype: str, group_rows: int = 16, tile_cols: int = 128,
                   block_t: int = 64, num_warps: int = 4):
    """Compile a kernel for an NVIDIA architecture without a GPU, specialised as the JIT does for a launch on
    contiguous, 16-byte aligned tensors (unit strides become constants, pointers and sizes divisible by 16)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = ops._values_grad_kernel if kernel == "values_grad" else ops._increment_kernel
    precision = "ieee" if dtype == "fp32" else "tf32"
    const = {"BR": group_rows, "BU": tile_cols, "BT": block_t, "PACKED": True, "SHIFT": 16, "UPCAST": False,
             "PRECISION": precision}
    if kernel == "values_grad":
        types = {"grad_ptr": f"*{dtype}", "xt_ptr": f"*{dtype}", "out_ptr": "*fp32"}
        const.update(stride_gr=1, stride_xt=1)
    else:
        types = {"xt_ptr": f"*{dtype}", "values_ptr": "*fp32", "y_ptr": f"*{dtype}"}
        const.update(stride_xt=1, stride_yr=1, ACCUMULATE=True)
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        else:
            signature[name] = types.get(name, "*i32" if name.endswith("_ptr") else "i32")
    aligned = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in signature
               if signature[name] != "constexpr"}
    source = ASTSource(fn, signature, const, aligned)
    return compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": 3})


def _aot_api() -> bool:
    import inspect

    try:
        from triton.compiler import ASTSource
    except ImportError:
        return False
    return "constexprs" in inspect.signature(ASTSource.__init__).parameters


@needs_triton
@pytest.mark.skipif(kernels.triton_interpret(), reason="the interpreter builds no compilable kernels")
@pytest.mark.parametrize("kernel", ["values_grad", "increment"])
@pytest.mark.parametrize(("arch", "dtype"), [(90, "bf16"), (90, "fp32"), (80, "bf16"), (80, "fp16")])
def test_kernels_compile_for_hopper_and_ampere_without_a_gpu(kernel, arch, dtype):
    # Triton compiles to a cubin on any machine (ptxas ships in its wheel): a GPU is needed to run, not to build.
    if not _aot_api():
        pytest.skip("this triton has an older ahead-of-time compile API")
    ops = kernels.load_triton_ops()
    compiled = _compile_ahead(ops, kernel, arch, dtype)
    ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
    assert cubin and f".target sm_{arch}" in ptx
    if dtype != "fp32":  # bf16/fp16 products on the tensor cores: wgmma on Hopper, mma on Ampere
        assert ("wgmma" in ptx) if arch == 90 else ("mma.sync" in ptx)
    assert "cp.async" in ptx  # the token loop is software-pipelined
    cuobjdump = Path(ops.triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.is_file():  # registers suffice: no spill to local memory
        binary = Path(os.environ.get("TMPDIR", "/tmp")) / f"sift-{kernel}-{arch}-{dtype}-{os.getpid()}.cubin"
        binary.write_bytes(cubin)
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(binary)], capture_output=True, text=True).stdout
        binary.unlink()
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage


def triton_layer(in_features, out_features, k, dtype, merge, values_grad, seed=0):
    torch.manual_seed(seed)
    layer = SiftLinear.convert(nn.Linear(in_features, out_features, dtype=dtype, device=DEVICE), "probe", k,
                               torch.float32, values_grad=values_grad, merge=merge)
    layer.set_selection(random_indices(out_features, in_features, k, seed=seed).to(DEVICE))
    with torch.no_grad():
        layer.values.normal_(std=0.05)
    return layer


@needs_triton
@pytest.mark.parametrize("merge", ["patch", "increment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_on_the_triton_path_matches_dense_autograd(ops, merge, dtype):
    in_features, out_features, k = 48, 40, 150
    layer = triton_layer(in_features, out_features, k, dtype, merge, "triton", seed=3)
    reference = nn.Linear(in_features, out_features, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        reference.weight.copy_(merged_weight(layer.weight.double(), layer.values.double(), layer.indices))
        reference.bias.copy_(layer.bias.double())
    x = torch.randn(3, 7, in_features, device=DEVICE).to(dtype).requires_grad_(True)
    upstream = torch.randn(3, 7, out_features, device=DEVICE).to(dtype)
    x_ref = x.detach().double().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    out_ref = reference(x_ref)
    (out_ref * upstream.double()).sum().backward()
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.double(), out_ref, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(x.grad.double(), x_ref.grad, rtol=tolerance, atol=tolerance)
    expected_values_grad = reference.weight.grad.view(-1)[layer.indices.long()]
    # the Triton values' gradient accumulates bf16 products in fp32: exact to fp32 rounding in every dtype
    torch.testing.assert_close(layer.values.grad.double(), expected_values_grad, rtol=1e-5, atol=1e-5)
    assert layer.weight.grad is None
    # the plan is built once per selection and reused
    assert layer.tile_plan() is layer.tile_plan()


@needs_triton
def test_triton_values_grad_matches_the_dense_path(ops):
    # fp32 inputs: the same dot products summed in another order, so equal to fp32 rounding
    layer = triton_layer(40, 24, 90, torch.float32, "patch", "triton", seed=5)
    x = torch.randn(11, 40, device=DEVICE, requires_grad=False)
    upstream = torch.randn(11, 24, device=DEVICE)
    (layer(x) * upstream).sum().backward()
    triton_grad = layer.values.grad.clone()
    layer.values.grad = None
    layer.values_grad = "dense"
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(triton_grad, layer.values.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not (CUDA and kernels.triton_importable()), reason="needs a GPU with triton")
@pytest.mark.parametrize("density", [0.005, 0.01, 0.05])
def test_llama_shape_bf16_on_gpu(ops, density):
    # A LLaMA-7B MLP matrix, 1024 tokens: both kernels against the dense bf16 path (int64 addressing, many tiles).
    out_features, in_features, tokens = 11008, 4096, 1024
    k = round(density * out_features * in_features)
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    indices = torch.randperm(out_features * in_features, generator=generator, device=DEVICE)[:k].sort().values.int()
    plan = build_tile_plan(indices, out_features, in_features)
    grad = torch.randn(tokens, out_features, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=torch.bfloat16)
    expected = torch.empty(k, device=DEVICE, dtype=torch.float32)
    for start in range(0, out_features, 1024):  # fp32 dense product in row blocks, gathered
        rows = slice(start, start + 1024)
        lo, hi = start * in_features, min(out_features, start + 1024) * in_features
        sel = (indices >= lo) & (indices < hi)
        block = grad[:, rows].float().t() @ x.float()
        expected[sel] = block.reshape(-1)[(indices[sel] - lo).long()]
    torch.testing.assert_close(ops.values_grad(grad, x, plan), expected, rtol=1e-3, atol=1e-3)
    values = torch.randn(k, device=DEVICE) * 0.01
    dense = torch.zeros(out_features * in_features, device=DEVICE, dtype=torch.bfloat16)
    dense[indices.long()] = values.to(torch.bfloat16)
    expected_y = (x.float() @ dense.view(out_features, in_features).float().t())
    torch.testing.assert_close(ops.increment_matmul(x, plan, values).float(), expected_y, rtol=2e-2, atol=2e-2)

