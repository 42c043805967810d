"""Sources beyond JSON files (Parquet, CSV, save_to_disk, hf:) and seeded mixtures with per-source stats."""

import json
import shutil

import pytest
from datasets import Dataset, DatasetDict

from sift_llm.config import load_config
from sift_llm.data import DataConfig, load_prepared, prepare
from sift_llm.data.config import SourceConfig
from sift_llm.errors import UserError
from sift_llm.schema import ConfigError, build

ALPACA = [{"instruction": f"Say the number {n}.", "input": "" if n % 2 else "quickly", "output": f"The answer is {n}."}
          for n in range(10)]
CHATS = [{"messages": [{"role": "user", "content": f"hello {n}"}, {"role": "assistant", "content": f"world {n}"}]}
         for n in range(6)]


def _cfg(tmp_path, **options):
    options.setdefault("validation_size", 0)
    options.setdefault("output_dir", str(tmp_path / "out"))
    return DataConfig(**options)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(prepared):
    return list(load_prepared(prepared.path)["train"])


def test_parquet_csv_and_save_to_disk_give_the_jsonl_examples(tmp_path, tiny_model_dir):
    reference = _train(prepare(_cfg(tmp_path, path=str(_jsonl(tmp_path / "a.jsonl", ALPACA))), tiny_model_dir))
    Dataset.from_list(ALPACA).to_parquet(str(tmp_path / "a.parquet"))
    Dataset.from_list(ALPACA).to_csv(str(tmp_path / "a.csv"), index=False)  # empty inputs: empty cells
    Dataset.from_list(ALPACA).save_to_disk(str(tmp_path / "saved"))
    DatasetDict({"train": Dataset.from_list(ALPACA), "test": Dataset.from_list(ALPACA[:2])}).save_to_disk(
        str(tmp_path / "saved_dict"))
    for path in ("a.parquet", "a.csv", "saved", "saved_dict"):
        prepared = prepare(_cfg(tmp_path, path=str(tmp_path / path)), tiny_model_dir)
        assert _train(prepared) == reference, path
        assert prepared.stats["sources"][0]["kind"] == {"a.parquet": "parquet", "a.csv": "csv"}.get(path, "disk")
    two = prepare(_cfg(tmp_path, path=str(tmp_path / "saved_dict"), split="test"), tiny_model_dir)
    assert two.stats["rows_read"] == 2
    with pytest.raises(UserError, match=r"saved_dict: no split 'dev' \(it has train, test\); set data.split"):
        prepare(_cfg(tmp_path, path=str(tmp_path / "saved_dict"), split="dev"), tiny_model_dir)


def test_dataset_rows_are_named_by_row_in_errors(tmp_path, tiny_model_dir):
    rows = ALPACA[:3] + [{"instruction": "no output", "input": "", "output": None}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(UserError, match=r"bad.parquet: 1 of 4 rows are invalid:\n  row 4: required field 'output' "
                                        r"is missing"):
        prepare(_cfg(tmp_path, path=str(tmp_path / "bad.parquet")), tiny_model_dir)


def test_hf_datasets_load_through_load_dataset_with_split_and_config(tmp_path, tiny_model_dir):
    repo = tmp_path / "repo"  # a dataset repository layout, as the hub (or its local cache) serves it
    (repo / "alpaca").mkdir(parents=True)
    (repo / "chat").mkdir()
    _jsonl(repo / "alpaca" / "train.jsonl", ALPACA)
    _jsonl(repo / "alpaca" / "test.jsonl", ALPACA[:3])
    _jsonl(repo / "chat" / "train.jsonl", CHATS)
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: alpaca\n  data_files:\n  - split: train\n    path: alpaca/train.jsonl\n"
        "  - split: test\n    path: alpaca/test.jsonl\n- config_name: chat\n  data_files:\n  - split: train\n"
        "    path: chat/train.jsonl\n---\n")
    alpaca = prepare(_cfg(tmp_path, path=f"hf:{repo}", hf_config="alpaca"), tiny_model_dir)
    assert alpaca.stats["rows_read"] == 10 and alpaca.stats["sources"][0]["kind"] == "hf"
    test = prepare(_cfg(tmp_path, path=f"hf:{repo}", hf_config="alpaca", split="test"), tiny_model_dir)
    assert test.stats["rows_read"] == 3
    chat = prepare(_cfg(tmp_path, path=f"hf:{repo}", hf_config="chat"), tiny_model_dir)
    assert chat.stats["examples"] == 6
    with pytest.raises(UserError, match=r"hf:.*repo \(split 'train', config 'nope'\): cannot load the dataset"):
        prepare(_cfg(tmp_path, path=f"hf:{repo}", hf_config="nope"), tiny_model_dir)


def test_an_unreachable_hub_dataset_is_a_user_error_offline(tmp_path, tiny_model_dir, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(UserError, match=r"hf:sift-llm-tests/no-such-dataset \(split 'train'\): cannot load the dataset"):
        prepare(_cfg(tmp_path, path="hf:sift-llm-tests/no-such-dataset"), tiny_model_dir)


def test_a_mixture_draws_seeded_counts_and_reports_each_source(tmp_path, tiny_model_dir):
    a = _jsonl(tmp_path / "a.jsonl", ALPACA)
    Dataset.from_list(CHATS).to_parquet(str(tmp_path / "chat.parquet"))
    sources = [SourceConfig(path=str(a), name="alpaca", samples=4),
               SourceConfig(path=str(tmp_path / "chat.parquet"), name="chat", ratio=2.0)]
    prepared = prepare(_cfg(tmp_path, sources=sources, validation_size=3), tiny_model_dir)
    stats = prepared.stats
    by_name = {s["name"]: s for s in stats["sources"]}
    assert by_name["alpaca"]["rows_read"] == 10 and by_name["alpaca"]["rows_drawn"] == 4
    assert by_name["chat"]["rows_read"] == 6 and by_name["chat"]["rows_drawn"] == 12
    assert sum(s["train_examples"] for s in stats["sources"]) == stats["train_examples"]
    assert sum(s["validation_examples"] for s in stats["sources"]) == stats["validation_examples"] == 3
    assert sum(s["tokens"] for s in stats["sources"]) >= stats["tokens"] > 0
    ds = load_prepared(prepared.path)
    train, held = [tuple(r["input_ids"]) for r in ds["train"]], [tuple(r["input_ids"]) for r in ds["validation"]]
    assert not set(train) & set(held)  # a repeated row never lands in both splits
    # every drawn copy of a row not held out is trained on; a held-out row is evaluated once
    held_alpaca, held_chat = by_name["alpaca"]["validation_examples"], by_name["chat"]["validation_examples"]
    assert len(train) == stats["train_examples"] == (4 - held_alpaca) + 2 * (6 - held_chat)
    assert len(held) == len(set(held)) == 3
    again = prepare(_cfg(tmp_path, sources=sources, validation_size=3, output_dir=str(tmp_path / "again")),
                    tiny_model_dir)
    assert again.stats["fingerprint"] == stats["fingerprint"] and _train(again) == list(ds["train"])
    reseeded = prepare(_cfg(tmp_path, sources=sources, validation_size=3, mix_seed=7), tiny_model_dir)
    assert reseeded.stats["fingerprint"] != stats["fingerprint"]


def test_a_list_in_data_path_mixes_every_row_and_drops_are_per_source(tmp_path, tiny_model_dir):
    a = _jsonl(tmp_path / "a.jsonl", ALPACA[:4])
    b = _jsonl(tmp_path / "b.jsonl", CHATS[:2] + [{"messages": [{"role": "user", "content": "alone"}]}])
    prepared = prepare(_cfg(tmp_path, path=[str(a), str(b)], skip_invalid=True), tiny_model_dir)
    stats = prepared.stats
    assert stats["examples"] == 6 and stats["dropped"] == 1
    assert stats["dropped_rows"][0]["source"] == str(b) and stats["dropped_rows"][0]["row"] == 3
    assert [s["dropped"] for s in stats["sources"]] == [0, 1]


def test_the_fingerprint_holds_no_paths(tmp_path, tiny_model_dir):
    """Another machine (or node) with the same bytes elsewhere computes the same fingerprint."""
    here = _jsonl(tmp_path / "a.jsonl", ALPACA)
    Dataset.from_list(CHATS).save_to_disk(str(tmp_path / "saved"))
    elsewhere = tmp_path / "other" / "place"
    elsewhere.mkdir(parents=True)
    shutil.copy(here, elsewhere / "renamed.jsonl")
    shutil.copytree(tmp_path / "saved", elsewhere / "saved")
    shutil.copytree(tiny_model_dir, elsewhere / "tokenizer")
    first = prepare(_cfg(tmp_path, path=[str(here), str(tmp_path / "saved")]), tiny_model_dir)
    second = prepare(_cfg(tmp_path, path=[str(elsewhere / "renamed.jsonl"), str(elsewhere / "saved")],
                          output_dir=str(tmp_path / "out2")), elsewhere / "tokenizer")
    assert second.stats["fingerprint"] == first.stats["fingerprint"]


def test_mixture_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.sources\[1\]: samples and ratio are exclusive"):
        build(DataConfig, {"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "samples": 3, "ratio": 0.5}]}, "data")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].samples"):
        build(DataConfig, {"sources": [{"path": "a.jsonl", "samples": 0}]}, "data")
    with pytest.raises(ConfigError, match=r"missing required key 'data.sources\[0\].path'"):
        build(DataConfig, {"sources": [{"samples": 3}]}, "data")
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("data:\n  path: [a.jsonl, b.parquet]\n  packing: true\n")
    cfg = load_config(experiment, ["data.sources=[{path: c.csv, ratio: 0.5}]"])
    assert cfg.data.path == ["a.jsonl", "b.parquet"] and cfg.data.sources[0].ratio == 0.5 and cfg.data.packing
