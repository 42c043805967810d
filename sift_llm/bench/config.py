"""The bench config: which parts run, on which shapes, for how many steps (benchmarks/*.yaml)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sift_llm import schema
from sift_llm.schema import ConfigError, option

PARTS = ("cost", "quality", "layer_stack", "kernels", "packing", "memory", "selection", "quantized")


@dataclass
class ModelShape:
    """A randomly initialised LLaMA-shaped model (the cost model), built once and cached."""

    hidden: int = option(1024, min=8, help="hidden size")
    intermediate: int = option(2816, min=8, help="MLP intermediate size")
    layers: int = option(16, min=1, help="decoder layers")
    heads: int = option(16, min=1, help="attention heads")
    kv_heads: int = option(16, min=1, help="key/value heads")
    tokenizer: str = option("asset:smollm2-135m-instruct", help="model directory whose tokenizer (and vocab) is used")
    seed: int = option(0, help="initialisation seed")


@dataclass
class CostConfig:
    """Cost of one training step through the real trainer (DeepSpeed, launch.sh, N ranks), methods alternated."""

    enabled: bool = option(True)
    model: ModelShape = field(default_factory=ModelShape)
    data: str = option("asset:alpaca_en_demo", help="instruction corpus (Alpaca format)")
    max_length: int = option(128, min=8, help="tokens per example")
    micro_batch_size: int = option(1, min=1, help="examples per rank per step")
    ranks: int = option(2, min=1, help="processes (CPU ranks over gloo, or GPUs) started by launch.sh")
    warmup_steps: int = option(3, min=0, help="steps left out of the timing")
    timed_steps: int = option(5, min=1, help="steps whose median is the step time")
    rounds: int = option(1, min=1, help="rounds of all methods, alternated; medians are taken over rounds too")
    sift_densities: list[float] = option(default_factory=lambda: [0.005, 0.01, 0.05], help="SIFT densities")
    lora_match_density: float = option(0.01, help="LoRA's rank is chosen to match SIFT's count at this density")
    full: bool = option(True, help="also run full fine-tuning")
    before_kernels_density: float | None = option(
        0.01, help="also run SIFT at this density with the previous layer kernels (dense copy + dense dW), or null"
    )
    sift_global_densities: list[float] = option(
        default_factory=list, help="also run SIFT with method.sift.scope=global at these densities (ZeRO 0-2 only)"
    )
    deepspeed_config: str = option("ds_configs/zero2.json", help="DeepSpeed JSON for every method")
    gradient_checkpointing: bool = option(False, help="model.gradient_checkpointing of every run (large models on a GPU)")
    state_probe: bool = option(True, help="measure trainable-state bytes inside a 1-rank DeepSpeed engine")
    probe_layers: int = option(2, min=1, help="decoder layers of the (smaller, same-width) state-probe model")


@dataclass
class QualityConfig:
    """Held-out loss after the same number of steps on a real model and corpus (the demo by default)."""

    enabled: bool = option(True)
    experiment: str = option("configs/demo.yaml", help="experiment config the runs start from")
    steps: int = option(24, min=1, help="optimizer steps per method")
    micro_batch_size: int = option(4, min=1)
    max_length: int = option(256, min=8)
    ranks: int = option(2, min=1)
    validation_size: int = option(48, min=1, help="held-out examples (all of them are evaluated)")
    eval_every: int = option(6, min=1, help="steps between held-out losses")
    sift_densities: list[float] = option(default_factory=lambda: [0.01, 0.05])
    lora_match_densities: list[float] = option(default_factory=lambda: [0.01], help="one LoRA run per density")
    full: bool = option(True)
    sift_lr: float = option(2e-4, help="learning rate of SIFT (paper: 2e-4)")
    lora_lr: float = option(2e-4, help="learning rate of LoRA (paper: 2e-4)")
    full_lr: float = option(2e-5, help="learning rate of full fine-tuning (paper: 2e-5); the recovery target's reference")
    extra_full_lrs: list[float] = option(default_factory=list, help="more full fine-tuning runs at these rates")
    extra_lora_lrs: list[float] = option(default_factory=list, help="more LoRA runs (each matched rank) at these rates")


@dataclass
class LayerStackConfig:
    """A stack of LLaMA decoder layers in plain PyTorch (no DeepSpeed): LLaMA-7B shapes on a GPU."""

    enabled: bool = option(False)
    hidden: int = option(4096, min=8)
    intermediate: int = option(11008, min=8)
    heads: int = option(32, min=1)
    layers: int = option(2, min=1)
    seq: int = option(2048, min=1)
    batch: int = option(1, min=1)
    dtype: str = option("bfloat16", help="base weights and activations: bfloat16 or float32")
    warmup_steps: int = option(3, min=0)
    timed_steps: int = option(10, min=1)
    rounds: int = option(1, min=1, help="rounds of all methods, alternated; step times are pooled over rounds")
    sift_densities: list[float] = option(default_factory=lambda: [0.01, 0.05])
    lora_match_density: float = option(0.01)
    full: bool = option(True)
    forced_paths: list[str] = option(
        default_factory=list, help="extra SIFT-at-lora_match_density runs forcing a values-gradient path: dense, sampled"
    )
    before_kernels: bool = option(True, help="also run SIFT at lora_match_density with the previous kernels")
    seed: int = option(0)


@dataclass
class KernelsConfig:
    """The values' gradient alone: dense row blocks vs the sampled product, per density, on one matrix."""

    enabled: bool = option(True)
    out_features: int = option(2816, min=1)
    in_features: int = option(1024, min=1)
    tokens: int = option(256, min=1)
    dtype: str = option("float32")
    densities: list[float] = option(default_factory=lambda: [0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2])
    repeats: int = option(7, min=1)


@dataclass
class PackingConfig:
    """Tokens/s and padding share, packed vs padded (data.packing), through the trainer on the demo at 512 tokens."""

    enabled: bool = option(False)
    experiment: str = option("configs/demo.yaml", help="experiment config both runs start from")
    max_length: int = option(512, min=8)
    ranks: int = option(2, min=1)
    validation_size: int = option(48, min=1, help="held-out examples (never packed; all of them are evaluated)")
    padded_micro_batch_size: int = option(4, min=1, help="examples per rank per step of the padded run")
    packed_micro_batch_size: int | None = option(
        None, min=1, help="packed sequences per rank per step; null: the count whose tokens come closest to the padded run's"
    )
    steps: int = option(12, min=1, help="steps of the padded run; the packed run's steps carry the same token budget")
    warmup_steps: int = option(2, min=0, help="steps left out of the timing")
    goal_ratio: float = option(1.8, help="target packed / padded tokens/s")


@dataclass
class MemoryConfig:
    """Peak memory per rank of the same SIFT run under several DeepSpeed configs (ZeRO-2, ZeRO-3, ZeRO-3 offload),
    through the trainer, and the largest model each fits in the machine's memory from the measured costs."""

    enabled: bool = option(False)
    model: ModelShape = field(default_factory=ModelShape)
    layer_counts: list[int] = option(
        default_factory=lambda: [4, 16], help="the cost model at these depths; two or more sizes give bytes per parameter"
    )
    models: list[str] = option(default_factory=list, help="real model directories measured too (e.g. asset:smollm2-135m-instruct)")
    deepspeed_configs: list[str] = option(
        default_factory=lambda: ["ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json"]
    )
    data: str = option("asset:alpaca_en_demo")
    max_length: int = option(128, min=8)
    micro_batch_size: int = option(1, min=1)
    ranks: int = option(2, min=1)
    density: float = option(0.01, help="SIFT density of every run")
    steps: int = option(2, min=1, help="training steps per run")
    budget_gib: float | None = option(
        None, help="memory the ranks may use: null = this machine's RAM (CPU ranks share it) or one GPU's memory"
    )
    sample_interval_s: float = option(0.05, min=0.005, help="how often each rank's RSS is read from /proc")
    trainer_root: str | None = option(
        None, help="another checkout whose launch.sh trains (before/after runs, e.g. a git worktree); null: this one"
    )


@dataclass
class SelectionConfig:
    """The selection pass alone, per scope and density, in one process per package version (global vs per_matrix)."""

    enabled: bool = option(False)
    model: ModelShape = field(default_factory=ModelShape)
    data: str = option("asset:alpaca_en_demo")
    max_length: int = option(128, min=8, help="tokens of the one calibration example")
    densities: list[float] = option(default_factory=lambda: [0.01, 0.05])
    scopes: list[str] = option(default_factory=lambda: ["per_matrix", "global"])
    rounds: int = option(2, min=1, help="rounds of all variants in each process, alternated")
    threads: int = option(1, min=1, help="torch threads of the worker (a training rank here runs with 1)")
    versions: dict[str, str] = option(
        default_factory=lambda: {"current": "."},
        help="label -> checkout whose sift_llm is measured (e.g. before: a git worktree of an older commit)",
    )
    rounds_per_version: dict[str, int] = option(default_factory=dict, help="label -> rounds (default: rounds)")


@dataclass
class QuantizedConfig:
    """SIFT on a 4-bit (NF4) base vs QLoRA at equal trainable parameters vs SIFT on the full-precision base, through
    the trainer (launch.sh, DeepSpeed) on the demo: peak memory, step time and held-out loss after the same steps."""

    enabled: bool = option(False)
    experiment: str = option("configs/demo.yaml", help="experiment config the runs start from")
    quantization: str = option("nf4", help="the 4-bit format of the quantized runs: nf4 or fp4")
    density: float = option(
        0.01, help="QLoRA's rank is the one whose parameter count is nearest SIFT's at this density; both SIFT runs "
        "then train exactly QLoRA's count (method.sift.budget)"
    )
    steps: int = option(24, min=1, help="optimizer steps per run")
    micro_batch_size: int = option(4, min=1)
    max_length: int = option(256, min=8)
    ranks: int = option(2, min=1)
    validation_size: int = option(48, min=1, help="held-out examples (all of them are evaluated)")
    eval_every: int = option(12, min=1, help="steps between held-out losses")
    learning_rate: float = option(2e-4, help="learning rate of every run (SIFT and LoRA: the paper's 2e-4)")
    warmup_steps: int = option(3, min=0, help="steps left out of the step-time median")
    rounds: int = option(1, min=1, help="rounds of all runs, alternated (odd rounds reversed); medians over rounds")
    full_precision: bool = option(True, help="also run SIFT on the full-precision base")
    qlora_extra_lrs: list[float] = option(default_factory=list, help="more QLoRA runs at these rates (sensitivity; "
                                          "not part of the goals)")
    deepspeed_config: str = option("ds_configs/zero2.json")
    memory_goal: float = option(1.10, help="target SIFT-4bit / QLoRA peak memory")
    step_time_goal: float = option(1.15, help="target SIFT-4bit / QLoRA step time")


@dataclass
class BenchConfig:
    name: str = option("bench", help="label of this run in the report")
    output_dir: str = option("benchmarks/results/cpu", help="where bench.json, bench.md and bench.png go")
    work_dir: str = option("runs/bench", help="scratch: cost model, run directories (deleted checkpoints)")
    cost: CostConfig = field(default_factory=CostConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    layer_stack: LayerStackConfig = field(default_factory=LayerStackConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    quantized: QuantizedConfig = field(default_factory=QuantizedConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    targets: dict[str, float] = option(
        default_factory=dict, help="limits the measured ratios are held to (name: limit; see sift_llm.bench.targets)"
    )

    def enabled_parts(self) -> list[str]:
        return [part for part in PARTS if getattr(self, part).enabled]

    @property
    def output(self) -> Path:
        return Path(self.output_dir)

    @property
    def work(self) -> Path:
        return Path(self.work_dir)


def load_bench_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> BenchConfig:
    """Read and validate a bench YAML with ``section.key=value`` overrides."""
    raw = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such bench config")
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    schema.apply_overrides(raw, list(overrides))
    try:
        cfg = schema.build(BenchConfig, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path else str(err)) from None
    from sift_llm.bench.targets import MEASURES, unknown_targets

    unknown = unknown_targets(cfg.targets)
    if unknown:
        raise ConfigError(f"{path or 'bench config'}: unknown target {unknown[0]!r} (targets: {', '.join(MEASURES)})")
    return cfg
