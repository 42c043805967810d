"""sift-llm export --format peft: a SIFT adapter that plain PEFT (and lm_eval) loads, with the same logits."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sift_test_utils import select, train
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import tiny
from sift_llm import cli
from sift_llm.config import load_config, save_resolved
from sift_llm.errors import UserError
from sift_llm.sift import SiftConfig, attach_sift, merge_into_base, save_adapter
from sift_llm.sift.adapter import META_FILE, TENSORS_FILE
from sift_llm.sift.peft_export import (
    EXPORT_META,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    PeftPaddingError,
    choose_sparsity,
    export_peft,
    pad_selection,
    peft_count,
    read_export_report,
)

# Runs in a fresh interpreter that imports only torch, safetensors, transformers and peft.
PLAIN_PEFT = r"""
import sys
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

base, adapter, data, out = sys.argv[1:5]
ids = load_file(data)["ids"]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
found = {}
for name, module in model.named_modules():
    if hasattr(module, "supertuning_indices") and "default" in module.supertuning_indices:
        found["indices/" + name.removeprefix("base_model.model.")] = module.supertuning_indices["default"].clone()
with torch.no_grad():
    unmerged = model(input_ids=ids).logits
    merged = model.merge_and_unload()(input_ids=ids).logits
assert "sift_llm" not in sys.modules, sorted(m for m in sys.modules if m.startswith("sift"))
save_file({"unmerged": unmerged.contiguous(), "merged": merged.contiguous(), **found}, out)
"""


def plain_peft_logits(base: Path, adapter: Path, ids: torch.Tensor, scratch: Path) -> dict[str, torch.Tensor]:
    scratch.mkdir(parents=True, exist_ok=True)
    save_file({"ids": ids}, str(scratch / "ids.safetensors"))
    out = scratch / "logits.safetensors"
    argv = [sys.executable, "-c", PLAIN_PEFT, str(base), str(adapter), str(scratch / "ids.safetensors"), str(out)]
    result = subprocess.run(argv, cwd=scratch, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return load_file(str(out))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def tied_base_dir(path: Path) -> Path:
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def trained_adapter(base: Path, out: Path, config: SiftConfig, *, seed: int = 1):
    """(SIFT model in memory, its handle, probe token ids): base + a selected, briefly trained increment, saved."""
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    handle = attach_sift(model, config)
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (2, 12), generator=generator) for _ in range(4)]
    select(handle, batches[:1])
    train(handle, batches[1:], lr=3e-2)
    model.eval()
    save_adapter(handle, out)
    return model, handle, torch.randint(0, vocab, (2, 16), generator=generator)


@pytest.fixture(scope="module")
def sift_adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sift") / "adapter"
    model, handle, ids = trained_adapter(tiny_model_dir, out, SiftConfig(density=0.05, dense_modules=["lm_head"]))
    return model, handle, ids, out


def make_run_dir(path: Path, base: Path, method: str = "sift", summary: bool = True) -> Path:
    """A run directory as sift-llm train leaves it: config.yaml (resolved), train_summary.json, adapter/."""
    cfg = load_config(None, [f"model.path={base}", f"method.name={method}", f"output_dir={path}"])
    save_resolved(cfg, path)
    if summary:
        (path / "train_summary.json").write_text(json.dumps({"method": method, "base_model": str(base)}))
    return path


def run_cli(*argv: str) -> int:
    return cli.main(["export", *map(str, argv)])


# ---------------------------------------------------------------------------------------- count rule


def test_sparsity_is_the_largest_that_covers_every_matrix():
    # SmolLM2-135M's projections (576 hidden, 192 k/v, 1536 MLP) at the demo's per-matrix density 1%
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    matrices = [(o * i, max(1, round(0.01 * o * i))) for o, i in shapes] * 30
    sparsity = choose_sparsity(matrices)
    counts = [peft_count(n, sparsity) for n, _ in matrices]
    assert all(c >= k for c, (_, k) in zip(counts, matrices))
    # the largest such sparsity: some matrix gets exactly its selection (any higher one would cut it short)
    assert min(c - k for c, (_, k) in zip(counts, matrices)) == 0
    padded = sum(counts) - sum(k for _, k in matrices)
    assert 0 < padded / sum(counts) < 0.001  # a few entries per matrix

    assert choose_sparsity([(100, 100)]) == 0.0  # a fully selected matrix
    sparsity = choose_sparsity([(1000, 10), (10, 1)])  # the small matrix binds: 10% density
    assert [peft_count(1000, sparsity), peft_count(10, sparsity)] == [100, 1]
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        numels = torch.randint(1, 10**6, (3,), generator=generator).tolist()
        matrices = [(n, 1 + int(torch.randint(0, n, (1,), generator=generator))) for n in numels]
        counts = [peft_count(n, choose_sparsity(matrices)) for n, _ in matrices]
        slack = [c - k for c, (_, k) in zip(counts, matrices)]
        assert min(slack) == 0


def test_padding_takes_the_lowest_free_positions_and_keeps_indices_sorted():
    indices = torch.tensor([0, 1, 3, 7], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    padded_indices, padded_values = pad_selection(indices, values, 7)
    assert padded_indices.tolist() == [0, 1, 2, 3, 4, 5, 7]
    assert padded_values.tolist() == [1.0, 2.0, 0.0, 3.0, 0.0, 0.0, 4.0]
    same, same_values = pad_selection(indices, values, 4)
    assert same.tolist() == indices.tolist() and torch.equal(same_values, values)


# ------------------------------------------------------------------------------- loading in plain PEFT


@pytest.mark.slow
def test_plain_peft_loads_the_export_with_the_sift_logits(sift_adapter, tiny_model_dir, tmp_path):
    model, handle, ids, adapter = sift_adapter
    out = export_peft(adapter, tmp_path / "peft")
    assert {p.name for p in out.iterdir()} == {PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, EXPORT_META}
    got = plain_peft_logits(tiny_model_dir, out, ids, tmp_path / "child")

    expected = logits(model, ids)
    merged = merge_into_base(copy.deepcopy(model))
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids))
    diff = (got["unmerged"] - expected).abs().max().item()
    print(f"max |logit difference| PEFT vs SIFT: {diff:.3g} (unmerged), "
          f"{(got['merged'] - logits(merged, ids)).abs().max().item():.3g} (merged)")
    torch.testing.assert_close(got["unmerged"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got["merged"], logits(merged, ids), atol=1e-5, rtol=0)
    # PEFT kept the exported indices (no magnitude re-selection): SIFT's own ones plus the padding
    for name, layer in handle.layers.items():
        loaded = got[f"indices/{name}"].long()
        assert torch.isin(layer.indices.long(), loaded).all()

    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == "SUPERTUNING" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert config["modules_to_save"] == ["lm_head"] and config["save_precomputed_indices"] is True
    assert sorted(config["target_modules"]) == sorted(handle.layers)


def test_exported_tensors_follow_peft_keys_dtypes_and_counts(sift_adapter, tmp_path):
    _, handle, _, adapter = sift_adapter
    out = export_peft(adapter, tmp_path / "peft")
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    report = read_export_report(out)
    tensors = load_file(str(out / PEFT_WEIGHTS_FILE))
    assert tensors["base_model.model.lm_head.weight"].equal(handle.model.lm_head.weight.detach())
    padded = 0
    for name, layer in handle.layers.items():
        indices = tensors[f"base_model.model.{name}.supertuning_indices"]
        values = tensors[f"base_model.model.{name}.supertuning_values"]
        assert indices.dtype == torch.int32 and values.dtype == torch.float32
        assert indices.numel() == peft_count(layer.numel_weight, config["sparsity"])
        assert indices.numel() == report["modules"][name]["exported"]
        assert (indices[1:] > indices[:-1]).all()
        at = torch.searchsorted(indices.long(), layer.indices.long())
        assert torch.equal(indices[at].long(), layer.indices.long())
        assert torch.equal(values[at], layer.values.detach().float())
        extra = torch.ones(indices.numel(), dtype=torch.bool)
        extra[at] = False
        assert (values[extra] == 0).all()
        padded += int(extra.sum())
    assert report["padded"] == padded > 0
    assert report["selected"] == sum(layer.k for layer in handle.layers.values())
    assert report["padded_share"] == pytest.approx(padded / report["exported"])


@pytest.mark.slow
def test_tied_embeddings_travel_with_a_dense_lm_head(tmp_path):
    base = tied_base_dir(tmp_path / "base")
    model, _, ids = trained_adapter(base, tmp_path / "adapter", SiftConfig(density=0.05, dense_modules=["lm_head"]))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = export_peft(tmp_path / "adapter", tmp_path / "peft")
    report = read_export_report(out)
    assert report["modules_to_save"] == ["lm_head", "model.embed_tokens"]
    assert report["tied"] == {"model.embed_tokens.weight": "lm_head.weight"}
    got = plain_peft_logits(base, out, ids, tmp_path / "child")
    torch.testing.assert_close(got["unmerged"], logits(model, ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["merged"], logits(model, ids), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- padding


def test_global_scope_padding_is_refused_unless_the_limit_is_raised(tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel

    config = SiftConfig(density=0.05, scope="global", dense_modules=["lm_head"])
    model, handle, ids = trained_adapter(tiny_model_dir, tmp_path / "adapter", config)
    assert run_cli(tmp_path / "adapter", "--output", tmp_path / "peft") == 2
    err = capsys.readouterr().err
    assert "zero padding" in err and "scope 'global'" in err and "--max-padding" in err and "Traceback" not in err
    assert not (tmp_path / "peft").exists() and not list(tmp_path.glob(".peft*"))
    with pytest.raises(PeftPaddingError):  # the eval backend can tell this refusal from other errors
        export_peft(tmp_path / "adapter", tmp_path / "peft")

    assert run_cli(tmp_path / "adapter", "--output", tmp_path / "peft", "--max-padding", "1") == 0
    report = read_export_report(tmp_path / "peft")
    assert report["padded_share"] > 0.1
    assert f"{report['padded']:,} of them zero padding ({report['padded_share']:.2%})" in capsys.readouterr().out
    # matrices the global top-k left empty are not targeted at all
    empty = [name for name, layer in handle.layers.items() if layer.k == 0]
    assert report["untargeted_empty"] == sorted(empty)
    assert set(report["modules"]) == set(handle.layers) - set(empty)
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "peft")
    torch.testing.assert_close(logits(peft_model.eval(), ids), logits(model, ids), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- run dirs, CLI


def test_run_directory_export_through_the_cli(sift_adapter, tiny_model_dir, tmp_path, capsys):
    _, handle, _, adapter = sift_adapter
    run = make_run_dir(tmp_path / "run", tiny_model_dir)
    (run / "adapter").symlink_to(adapter, target_is_directory=True)
    assert run_cli(run, "--format", "peft", "--output", tmp_path / "peft") == 0
    out = capsys.readouterr().out
    report = read_export_report(tmp_path / "peft")
    assert f"{report['selected']:,} selected entries in {len(handle.layers)} matrices" in out
    assert f"{report['padded']:,} of them zero padding" in out
    assert f"pretrained={Path(tiny_model_dir).resolve()},peft={(tmp_path / 'peft').resolve()}" in out
    assert report["source"]["run_dir"] == str(run.resolve())

    # no train_summary.json: the base comes from config.yaml's model.path
    bare = make_run_dir(tmp_path / "bare", tiny_model_dir, summary=False)
    (bare / "adapter").symlink_to(adapter, target_is_directory=True)
    export_peft(bare, tmp_path / "peft2")
    assert json.loads((tmp_path / "peft2" / PEFT_CONFIG_FILE).read_text())["base_model_name_or_path"] == str(
        Path(tiny_model_dir).resolve())

    # an existing output is kept unless --force
    assert run_cli(run, "--output", tmp_path / "peft") == 2
    assert "already exists" in capsys.readouterr().err
    assert run_cli(run, "--output", tmp_path / "peft", "--force") == 0


def test_the_runs_merged_model_is_refused_as_the_base(sift_adapter, tmp_path, capsys):
    model, _, _, adapter = sift_adapter
    merged = tmp_path / "merged"
    merge_into_base(copy.deepcopy(model)).save_pretrained(merged)
    # same names and shapes, but the selected entries already hold the increment: PEFT would add it twice
    assert run_cli(adapter, "--output", tmp_path / "peft", "--base", merged) == 2
    err = capsys.readouterr().err
    assert "holds other weights at the adapter's positions" in err and "merged model" in err
    assert not (tmp_path / "peft").exists()


def test_lora_run_adapter_is_copied_with_its_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    run = make_run_dir(tmp_path / "run", tiny_model_dir, method="lora")
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(run / "adapter")
    out = export_peft(run, tmp_path / "peft")
    assert read_export_report(out)["pass_through"] is True
    config = json.loads((out / PEFT_CONFIG_FILE).read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    ids = torch.tensor([[5, 6, 7, 8]])
    copied = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    assert torch.equal(logits(copied, ids), logits(lora.eval(), ids))


def test_bad_sources_are_clear_errors(sift_adapter, tiny_model_dir, tmp_path, capsys):
    adapter = sift_adapter[3]

    def fails(source, *extra, expect: str) -> None:
        out = tmp_path / "out"
        assert run_cli(source, "--output", out, *extra) == 2
        err = capsys.readouterr().err
        assert expect in err and "Traceback" not in err, err
        assert not out.exists()

    fails(tmp_path / "missing", expect="does not exist")
    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", expect="neither a training run directory")
    full = make_run_dir(tmp_path / "full", tiny_model_dir, method="full")
    fails(full, expect="full fine-tuning run")
    unfinished = make_run_dir(tmp_path / "unfinished", tiny_model_dir)
    fails(unfinished, expect="holds no trained adapter")

    def broken(name: str) -> Path:
        copy_dir = tmp_path / name
        copy_dir.mkdir()
        for file in (META_FILE, TENSORS_FILE):
            (copy_dir / file).write_bytes((adapter / file).read_bytes())
        return copy_dir

    garbage = broken("garbage")
    (garbage / TENSORS_FILE).write_bytes(b"not a safetensors file")
    fails(garbage, expect="not a readable safetensors file")
    bad_json = broken("bad_json")
    (bad_json / META_FILE).write_text("{ truncated")
    fails(bad_json, expect="not valid JSON")
    out_of_range = broken("out_of_range")
    tensors = load_file(str(adapter / TENSORS_FILE))
    name = next(key for key in tensors if key.endswith(".indices"))
    tensors[name] = tensors[name].clone()
    tensors[name][-1] = 10**7
    save_file(tensors, str(out_of_range / TENSORS_FILE))
    fails(out_of_range, expect="must be sorted, unique flat positions")
    no_base = broken("no_base")
    fails(no_base, "--base", tmp_path / "nowhere", expect="is not a model directory")
    wider = tmp_path / "wider"
    tiny.build_model(96, hidden=48).save_pretrained(wider)
    fails(adapter, "--base", wider, expect="differ in names or shapes")
    with pytest.raises(UserError, match="max_padding"):
        export_peft(adapter, tmp_path / "out", max_padding=1.5)


# ------------------------------------------------------------------------------------------ lm_eval


TASK = """\
task: sift_export_ll
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{question}}}}\\nAnswer:"
doc_to_target: " {{{{answer}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
metadata:
  version: 1.0
"""


def lm_eval_perplexity(model_args: str, tasks: Path, scratch: Path) -> float:
    scratch.mkdir(parents=True)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_CACHE=str(scratch / "datasets"))
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", model_args,
               "--tasks", "sift_export_ll", "--include_path", str(tasks), "--device", "cpu", "--batch_size", "2",
               "--limit", "4", "--output_path", str(scratch / "out" / "results.json")]
    result = subprocess.run(command, cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    found = sorted((scratch / "out").rglob("results*.json"))
    assert found, result.stderr[-2000:]
    return json.loads(found[-1].read_text())["results"]["sift_export_ll"]["perplexity,none"]


@pytest.mark.slow
def test_lm_eval_scores_the_exported_adapter_like_the_merged_model(sift_adapter, tiny_model_dir, tmp_path):
    model, _, _, adapter = sift_adapter
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [("What is the capital of France?", "Paris"), ("Give three tips for staying healthy.", "Eat well"),
            ("What is 2 + 2?", "4"), ("The quick brown fox jumps over the lazy what?", "dog")]
    (tasks / "rows.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    (tasks / "sift_export_ll.yaml").write_text(TASK.format(data=json.dumps(str(tasks / "rows.jsonl"))))
    out = export_peft(adapter, tmp_path / "peft")
    merged_dir = tmp_path / "merged"
    merge_into_base(copy.deepcopy(model)).save_pretrained(merged_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(merged_dir)

    base = Path(tiny_model_dir).resolve()
    with_peft = lm_eval_perplexity(f"pretrained={base},peft={out},dtype=float32", tasks, tmp_path / "a")
    merged = lm_eval_perplexity(f"pretrained={merged_dir},dtype=float32", tasks, tmp_path / "b")
    print(f"lm_eval perplexity: base+PEFT export {with_peft:.6g}, merged SIFT {merged:.6g}")
    assert with_peft == pytest.approx(merged, rel=1e-5)
