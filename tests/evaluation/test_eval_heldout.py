"""The held-out tasks: exact label tokens scored through lm-eval, equal to the trainer's held-out loss;
greedy generation samples; the run-directory wiring."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from eval_helpers import CHAT_ROWS, INSTRUCTION_ROWS, eval_losses, run_training, write_experiment

from sift_llm.errors import UserError
from sift_llm.evaluation import EvalConfig, harness, heldout, pipeline
from sift_llm.schema import ConfigError, build


def _prepare(tmp_path, model_dir, rows, **data):
    from sift_llm.data.config import DataConfig
    from sift_llm.data.stage import prepare

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = build(DataConfig, {"path": str(corpus), "validation_size": 6, "output_dir": str(tmp_path / "data"), **data},
                "data")
    return prepare(cfg, model_dir).path


def _trainer_quantity(model, dataset_dir, micro_batch_size=2) -> float:
    """The trainer's held-out loss on one rank over the whole split: token-weighted mean of HF's shifted loss."""
    from sift_llm.data.stage import load_prepared
    from sift_llm.train.batches import collate

    validation = load_prepared(dataset_dir)["validation"]
    loss_sum = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(validation), micro_batch_size):
            batch = collate([validation[i] for i in range(start, min(start + micro_batch_size, len(validation)))], 0)
            count = float((batch["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**batch).loss) * count
            tokens += count
    return loss_sum / tokens


def _cfg(tiny_task_dir, **extra) -> EvalConfig:
    return build(EvalConfig, {"tasks": ["tiny_mc"], "include_paths": [str(tiny_task_dir)], "limit": 1,
                              "batch_size": 4, **extra}, "eval")


# ------------------------------------------------------------------------------------------ spans


def test_label_spans_score_exactly_the_shifted_labels():
    ids = [1, 10, 11, 12, 13, 14, 15, 16]
    labels = [-100, -100, -100, 12, 13, -100, 15, 16]
    assert heldout.label_spans(ids, labels) == [(3, 5), (6, 8)]
    assert heldout.token_requests(ids, labels) == [([1, 10, 11], [12, 13]), ([1, 10, 11, 12, 13, 14], [15, 16])]
    # position 0 has no left context: the trainer's shifted loss never scores it, nor do we
    assert heldout.label_spans([5, 6, 7], [5, 6, -100]) == [(1, 2)]
    assert heldout.label_spans([5, 6], [-100, -100]) == []
    with pytest.raises(UserError, match="label 99 at position 2 is not its input token 11"):
        heldout.label_spans(ids, [-100, -100, 99, 12, 13, 14, 15, 16])
    with pytest.raises(UserError, match="differ in length"):
        heldout.label_spans(ids, labels[:-1])


def test_committed_task_files_match_the_python():
    from sift_llm.evaluation.taskfiles import files_out_of_sync

    assert files_out_of_sync(heldout.COMMITTED_TASK_DIR, heldout.render_task_files()) == []
    assert heldout.main(["--check"]) == 0


def test_config_options_and_reserved_task_names(tiny_task_dir):
    cfg = build(EvalConfig, {}, "eval")
    assert cfg.heldout is True and cfg.samples == 5 and cfg.max_new_tokens == 128
    with pytest.raises(ConfigError, match="eval.samples"):
        build(EvalConfig, {"samples": -1}, "eval")
    with pytest.raises(ConfigError, match="eval.max_new_tokens"):
        build(EvalConfig, {"max_new_tokens": 0}, "eval")
    with pytest.raises(UserError, match="heldout_likelihood is evaluated from the run's own held-out split"):
        harness.evaluate_lm(None, _cfg(tiny_task_dir, tasks=["heldout_likelihood"]))


# ----------------------------------------------------------------------------- exact token scoring


def test_dataset_docs_are_scored_on_their_tokens_not_their_text(tiny_model_dir):
    """The text of the request is ignored for a doc that carries tokens: the scored tokens are the labels."""
    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sift_llm.evaluation.lm import DatasetTokensLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lm = DatasetTokensLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    ids = tokenizer("What is the capital of France? Paris is the capital").input_ids
    labels = [-100] * 5 + ids[5:9] + [-100] * 2 + ids[11:]
    doc = {"input_ids": ids, "labels": labels}
    requests = [Instance("loglikelihood", doc, ("garbage context", " garbage"), 0, ("t", 0, 1)),
                Instance("loglikelihood", {"text": "plain"}, ("The quick", " brown fox"), 0, ("t", 1, 1))]
    (exact, _), (plain, _) = lm.loglikelihood(requests)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    expected = sum(float(logprobs[j - 1, ids[j]]) for j in range(1, len(ids)) if labels[j] != -100)
    assert exact == pytest.approx(expected, abs=1e-4)
    # a doc without tokens goes through HFLM's own string path
    context, continuation = tokenizer("The quick").input_ids, tokenizer(" brown fox").input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([context + continuation])).logits[0].float(), -1)
    expected_plain = sum(float(logprobs[len(context) + k - 1, t]) for k, t in enumerate(continuation))
    assert plain == pytest.approx(expected_plain, abs=1e-4)


@pytest.mark.parametrize("rows, data", [(INSTRUCTION_ROWS, {}), (CHAT_ROWS, {"format": "sharegpt"})],
                         ids=["alpaca", "chat"])
def test_heldout_nll_is_the_trainers_token_weighted_loss(tiny_model_dir, tiny_task_dir, tmp_path, rows, data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = _prepare(tmp_path, tiny_model_dir, rows, **data)
    source = heldout.source_for(dataset, likelihood=True, samples=0, max_new_tokens=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results = harness.evaluate_loaded(model, tokenizer, _cfg(tiny_task_dir), heldout=source)
    entry = results["results"][heldout.LIKELIHOOD]
    expected = _trainer_quantity(model, dataset)
    assert entry["nll,none"] == pytest.approx(expected, abs=1e-5)
    assert entry["token_perplexity,none"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert entry["sample_len"] == 6 and entry["nll_stderr,none"] > 0
    per_doc = results["sift_llm"]["per_doc"][heldout.LIKELIHOOD]
    assert per_doc["metric"] == "nll" and len(per_doc["values"]) == 6
    assert entry["tokens"] == sum(n for _, n in per_doc["values"].values())
    if data:  # chat: both assistant turns of each conversation are scored
        from sift_llm.data.stage import load_prepared

        example = load_prepared(dataset)["validation"][0]
        assert len(heldout.label_spans(example["input_ids"], example["labels"])) == 2
    assert "mmlu_offline" not in results["results"] and "tiny_mc" in results["results"]


def test_generation_samples_are_greedy_bounded_and_stop_at_eos(tiny_model_dir, tiny_task_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dataset = _prepare(tmp_path, tiny_model_dir, INSTRUCTION_ROWS)
    source = heldout.source_for(dataset, likelihood=False, samples=2, max_new_tokens=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results = harness.evaluate_loaded(model, tokenizer, _cfg(tiny_task_dir, batch_size=1), heldout=source)
    generated = results["sift_llm"]["generations"]
    assert [g["index"] for g in generated] == [0, 1] and heldout.LIKELIHOOD not in results["results"]
    for g in generated:
        assert g["prompt"].endswith("### Response:") and g["reference"].startswith("The answer is")
        prompt_ids = tokenizer(g["prompt"], return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(prompt_ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        new = out[0, prompt_ids.shape[1]:]
        assert len(new) == 6 and tokenizer.eos_token_id not in new.tolist()  # the bound, not EOS, ended it
        # the same greedy tokens: one more new token would have made a longer text
        assert g["response"] == tokenizer.decode(new, skip_special_tokens=True)

    # EOS ends a response: make EOS the only likely next token and the response is empty
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        model.model.norm.weight.fill_(1.0)
    stopped = harness.evaluate_loaded(model, tokenizer, _cfg(tiny_task_dir, batch_size=1), heldout=source)
    assert [g["response"] for g in stopped["sift_llm"]["generations"]] == ["", ""]


# ---------------------------------------------------------------------------------------- run dirs


def test_source_errors_name_the_file(tmp_path, tiny_model_dir):
    with pytest.raises(UserError, match="is not a prepared dataset"):
        heldout.source_for(tmp_path, likelihood=True, samples=0, max_new_tokens=8)
    (tmp_path / "fingerprint.json").write_text("{oops")
    with pytest.raises(UserError, match="fingerprint.json:1: not valid JSON"):
        heldout.source_for(tmp_path, likelihood=True, samples=0, max_new_tokens=8)
    (tmp_path / "none").mkdir()
    dataset = _prepare(tmp_path / "none", tiny_model_dir, INSTRUCTION_ROWS, validation_size=0)
    with pytest.raises(UserError, match="has no validation split"):
        heldout.source_for(dataset, likelihood=True, samples=0, max_new_tokens=8)


def test_run_without_a_train_summary_skips_the_heldout_tasks(tmp_path, tiny_model_dir, capsys):
    config = write_experiment(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    spec = pipeline.read_run_eval_config(run)
    assert pipeline.heldout_source(spec) is None
    assert "held-out likelihood and samples are skipped" in capsys.readouterr().out
    (run / "train_summary.json").write_text("[1,")
    with pytest.raises(UserError, match="train_summary.json:1: not valid JSON"):
        pipeline.heldout_source(spec)
    (run / "train_summary.json").write_text('{"dataset": 3}')
    with pytest.raises(UserError, match="expected a 'dataset' string"):
        pipeline.heldout_source(spec)
    spec.eval = build(EvalConfig, {"heldout": False, "samples": 0}, "eval")
    assert pipeline.heldout_source(spec) is None  # nothing asked for: the summary is not even read


def test_a_run_without_a_validation_split_skips_the_heldout_tasks(tmp_path, tiny_model_dir, capsys):
    (tmp_path / "none").mkdir()
    dataset = _prepare(tmp_path / "none", tiny_model_dir, INSTRUCTION_ROWS, validation_size=0)
    config = write_experiment(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    (run / "train_summary.json").write_text(json.dumps({"dataset": str(dataset)}))
    assert pipeline.heldout_source(pipeline.read_run_eval_config(run)) is None
    assert "has no validation split" in capsys.readouterr().out


def test_a_removed_dataset_is_rebuilt_from_the_runs_data_section(tmp_path, tiny_model_dir):
    from sift_llm.config import load_config
    from sift_llm.data.stage import prepare

    config = write_experiment(tmp_path, tiny_model_dir)
    cfg = load_config(config)
    dataset = prepare(cfg.data, cfg.model.path).path
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    (run / "train_summary.json").write_text(json.dumps({"dataset": str(dataset)}))
    shutil.rmtree(dataset)
    source = pipeline.heldout_source(pipeline.read_run_eval_config(run))
    assert source.dataset == dataset and (dataset / "dataset" / "validation").is_dir()
    (run / "train_summary.json").write_text(json.dumps({"dataset": str(tmp_path / "elsewhere")}))
    with pytest.raises(UserError, match="which is gone, and the run's data: section now builds a different dataset"):
        pipeline.heldout_source(pipeline.read_run_eval_config(run))


@pytest.mark.slow
def test_two_rank_run_harness_nll_equals_the_trainers_eval_loss(tmp_path, tiny_model_dir, tiny_task_dir):
    """The trainer evaluates the whole split (eval_batches unset, 6 examples over 2 ranks); lm-eval's held-out
    NLL of the base and of the tuned model equal its step-0 and final eval_loss."""
    config = write_experiment(tmp_path, tiny_model_dir, train={"eval_every": 2},
                              eval_section={"tasks": ["tiny_mc"], "include_paths": [str(tiny_task_dir)],
                                            "batch_size": 4, "samples": 2, "max_new_tokens": 8})
    run = run_training(config, ranks=2)
    losses = eval_losses(run)
    assert pipeline.evaluate_run(run) == run / "report.md"
    base = json.loads((run / "eval" / "base" / "results.json").read_text())["results"][heldout.LIKELIHOOD]
    tuned = json.loads((run / "eval" / "tuned" / "results.json").read_text())["results"][heldout.LIKELIHOOD]
    assert losses[0][0] == 0 and abs(base["nll,none"] - losses[0][1]) < 1e-4
    assert abs(tuned["nll,none"] - losses[-1][1]) < 1e-4
    assert tuned["nll,none"] < base["nll,none"]  # it trained
    text = (run / "report.md").read_text()
    assert text.index("## Held-out response likelihood") < text.index("## Benchmarks") < text.index("## Samples")
    assert "| **NLL per token** | 6 |" in text and "beyond noise" in text
    samples = json.loads((run / "samples.json").read_text())["samples"]
    assert len(samples) == 2 and set(samples[0]["responses"]) == {"base", "sift"}


def test_cli_options_reach_the_eval_section(tmp_path, tiny_model_dir, capsys):
    from sift_llm.cli import build_parser, main
    from sift_llm.commands.eval import overrides_from_args

    args = build_parser().parse_args(["eval", "RUN", "eval.heldout=false", "eval.samples=2", "eval.max_new_tokens=16"])
    assert overrides_from_args(args) == {"heldout": False, "samples": 2, "max_new_tokens": 16}
    config = write_experiment(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    assert main(["eval", str(run), "eval.samples=-1"]) == 2
    assert "eval.samples" in capsys.readouterr().err


def test_cli_backend_skips_the_heldout_tasks_and_leaves_them_out_of_the_cache_key(
        tiny_model_dir, tiny_task_dir, tmp_path, monkeypatch):
    from sift_llm.evaluation import cache, cli_backend

    dataset = _prepare(tmp_path, tiny_model_dir, INSTRUCTION_ROWS)
    source = heldout.source_for(dataset, likelihood=True, samples=2, max_new_tokens=8)
    seen = []

    def fake_cli(model_dir, cfg, adapter_dir=None, *, heldout=None):
        seen.append(heldout)
        return {"results": {"tiny_mc": {"acc,none": 0.5}}, "sift_llm": {"heldout_skipped": "cli"}}

    monkeypatch.setattr(cli_backend, "evaluate_with_cli", fake_cli)
    cfg = _cfg(tiny_task_dir, backend="cli")
    results = harness.evaluate_base(tiny_model_dir, cfg, heldout=source)
    assert seen == [None]
    assert results["sift_llm"]["fingerprint"] == cache.base_results_key(tiny_model_dir, cfg)[0]
    memory = build(EvalConfig, {**cfg.__dict__, "backend": "memory"}, "eval")
    assert cache.base_results_key(tiny_model_dir, memory, source)[0] != cache.base_results_key(tiny_model_dir, memory)[0]


def test_the_loader_stands_alone_and_the_old_import_still_works():
    import subprocess
    import sys

    from sift_llm import loading

    assert harness.load_model is loading.load_model  # sift_llm.train.methods imports it from the harness today
    out = subprocess.run([sys.executable, "-c", "import sys, sift_llm.loading; "
                          "print(sorted(m for m in sys.modules if m.startswith('sift_llm.evaluation')))"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "[]"  # loading a model does not import the evaluation package
