import json
import shutil
from pathlib import Path

import pytest

from sift_llm.data import DataConfig, load_prepared, prepare
from sift_llm.data.encode import IGNORE_INDEX
from sift_llm.errors import UserError

EXAMPLES = Path(__file__).parents[2] / "data" / "examples"


def _cfg(tmp_path, path, **options):
    options.setdefault("validation_size", 1)
    return DataConfig(path=str(path), output_dir=str(tmp_path / "out"), **options)


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_alpaca_jsonl_becomes_a_split_masked_dataset_with_stats(tmp_path, tiny_model_dir):
    prepared = prepare(_cfg(tmp_path, EXAMPLES / "alpaca_sample.jsonl"), tiny_model_dir)
    assert not prepared.cached
    ds = load_prepared(prepared.path)
    assert (len(ds["train"]), len(ds["validation"])) == (3, 1)
    for example in list(ds["train"]) + list(ds["validation"]):
        assert len(example["input_ids"]) == len(example["labels"])
        assert example["labels"][0] == IGNORE_INDEX and example["labels"][-1] != IGNORE_INDEX
    stats = json.loads((prepared.path / "stats.json").read_text())
    assert stats["rows_read"] == 4 and stats["examples"] == 4 and stats["dropped"] == 0
    assert stats["tokens"] == sum(len(e["input_ids"]) for s in ds.values() for e in s)
    assert set(stats["length_percentiles"]) == {"min", "p50", "p90", "p95", "p99", "max"}


def test_second_identical_run_is_cached_and_changes_invalidate(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, EXAMPLES / "alpaca_sample.jsonl")
    first = prepare(cfg, tiny_model_dir)
    second = prepare(cfg, tiny_model_dir)
    assert second.cached and second.stats == first.stats
    shorter = prepare(_cfg(tmp_path, EXAMPLES / "alpaca_sample.jsonl", max_length=100), tiny_model_dir)
    assert not shorter.cached and shorter.stats["fingerprint"] != first.stats["fingerprint"]
    edited = tmp_path / "edited.jsonl"
    edited.write_text((EXAMPLES / "alpaca_sample.jsonl").read_text().replace("Paris.", "Paris!"))
    assert not prepare(_cfg(tmp_path, edited), tiny_model_dir).cached
    tokenizer_copy = tmp_path / "tok"
    shutil.copytree(tiny_model_dir, tokenizer_copy)
    config = json.loads((tokenizer_copy / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77
    (tokenizer_copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert not prepare(_cfg(tmp_path, EXAMPLES / "alpaca_sample.jsonl"), tokenizer_copy).cached


def test_dolly_fields_are_mapped(tmp_path, tiny_model_dir):
    prepared = prepare(_cfg(tmp_path, EXAMPLES / "dolly_sample.jsonl", format="dolly"), tiny_model_dir)
    assert prepared.stats["examples"] == 2
    with pytest.raises(UserError, match="required field 'output' is missing"):
        prepare(_cfg(tmp_path, EXAMPLES / "dolly_sample.jsonl"), tiny_model_dir)


@pytest.mark.parametrize("name", ["sharegpt_sample.json", "messages_sample.jsonl"])
def test_chat_formats_are_detected_and_masked(tmp_path, tiny_model_dir, name):
    prepared = prepare(_cfg(tmp_path, EXAMPLES / name, validation_size=0), tiny_model_dir)
    ds = load_prepared(prepared.path)["train"]
    assert len(ds) == prepared.stats["examples"] > 0
    for example in ds:
        learned = sum(label != IGNORE_INDEX for label in example["labels"])
        assert 0 < learned < len(example["labels"])


def _write(tmp_path, name, text, mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


BAD_INPUTS = [
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n', r"bad.jsonl:2: invalid JSON line"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "a" "output": "b"}\n]\n', r"bad.json:3: invalid JSON"),
    ("open.json", '[\n {"instruction": "a", "output": "b"},\n', r"open.json:3: invalid JSON"),
    ("empty.jsonl", "  \n", r"empty.jsonl: the file is empty"),
    ("latin1.jsonl", b'{"instruction": "caf\xe9", "output": "b"}\n', r"latin1.jsonl:1: not valid UTF-8"),
    (
        "missing.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n{"instruction": "", "output": "b"}\n',
        r"2 of 3 rows are invalid:\n  row 2 \(line 2\): required field 'output' is missing\n"
        r"  row 3 \(line 3\): required field 'instruction' is empty",
    ),
]


@pytest.mark.parametrize("name,text,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(tmp_path, tiny_model_dir, name, text, message):
    path = _write(tmp_path, name, text)
    before = _leftovers(tmp_path)
    with pytest.raises(UserError, match=message):
        prepare(_cfg(tmp_path, path), tiny_model_dir)
    assert _leftovers(tmp_path) == before


def test_skip_invalid_drops_and_reports_each_row(tmp_path, tiny_model_dir):
    path = _write(
        tmp_path,
        "mixed.jsonl",
        '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n[1, 2]\n{"instruction": "c", "output": "d"}\n',
    )
    prepared = prepare(_cfg(tmp_path, path, skip_invalid=True), tiny_model_dir)
    assert prepared.stats["examples"] == 2
    assert [(d["row"], d["line"]) for d in prepared.stats["dropped_rows"]] == [(2, 2), (3, 3)]
    assert "expected a JSON object" in prepared.stats["dropped_rows"][1]["reason"]


def test_over_long_rows_are_counted(tmp_path, tiny_model_dir):
    long_output = " ".join(["the answer is"] * 40)
    lines = [json.dumps({"instruction": "Explain the answer.", "output": long_output}),
             json.dumps({"instruction": "Say hello.", "output": "hello"})]
    path = _write(tmp_path, "long.jsonl", "\n".join(lines) + "\n")
    truncated = prepare(_cfg(tmp_path, path, max_length=64, validation_size=0), tiny_model_dir)
    assert truncated.stats["truncated"] == 1 and truncated.stats["dropped"] == 0
    assert truncated.stats["length_percentiles"]["max"] == 64
    dropped = prepare(_cfg(tmp_path, path, max_length=64, validation_size=0, truncation="drop"), tiny_model_dir)
    assert dropped.stats["examples"] == 1 and "over max_length 64" in dropped.stats["dropped_rows"][0]["reason"]
