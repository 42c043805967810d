"""Run the data stage: read, validate, encode, truncate, split and write a fingerprinted dataset."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from sift_llm import assets
from sift_llm.data.config import DataConfig
from sift_llm.data.encode import IGNORE_INDEX, encode_chat, encode_instructions, fit_length
from sift_llm.data.readers import ChatRow, InvalidRow, parse_rows, read_records
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir, atomic_write_json
from sift_llm.runtime import progress

# Bump when the encoding changes, so cached datasets built by older code are not reused.
DATA_FORMAT_VERSION = 1
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
ENCODE_CHUNK = 256


@dataclass
class PreparedData:
    path: Path  # holds dataset/ (HF DatasetDict: train and, when non-empty, validation), stats.json, fingerprint.json
    stats: dict
    cached: bool

    @property
    def dataset_path(self) -> Path:
        return self.path / "dataset"


def fingerprint(cfg: DataConfig, data_file: Path, tokenizer_dir: Path) -> str:
    """Identity of the output: input bytes, tokenizer files, and every option that changes the examples."""
    digest = hashlib.sha256()
    digest.update(f"format-version={DATA_FORMAT_VERSION}\n".encode())
    digest.update(data_file.read_bytes())
    for name in TOKENIZER_FILES:
        candidate = tokenizer_dir / name
        if candidate.is_file():
            digest.update(name.encode() + b"\0" + candidate.read_bytes())
    options = {k: v for k, v in vars(cfg).items() if k not in ("path", "output_dir")}
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def prepare(cfg: DataConfig, tokenizer_dir: str | Path) -> PreparedData:
    """Build (or reuse, when the fingerprint matches) the tokenized dataset described by ``cfg``."""
    data_file = assets.resolve(cfg.path)
    tokenizer_dir = assets.resolve(str(tokenizer_dir))
    key = fingerprint(cfg, data_file, tokenizer_dir)
    out = Path(cfg.output_dir).expanduser() if cfg.output_dir else assets.cache_dir() / "datasets" / key[:16]
    stamp = out / "fingerprint.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == key:
        return PreparedData(out, json.loads((out / "stats.json").read_text()), cached=True)

    started = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    records = read_records(data_file)
    rows, invalid = parse_rows(data_file, records, cfg.format, cfg.field_map(), cfg.skip_invalid)
    dropped = [{"row": r.row, "line": r.line, "reason": f"invalid: {why}"} for r, why in invalid]
    examples, truncated = [], 0
    with progress(total=len(rows), desc="tokenize", unit="row") as bar:
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK]
            for row, encoded in zip(chunk, _encode_chunk(tokenizer, chunk, cfg)):
                try:
                    if isinstance(encoded, InvalidRow):
                        raise encoded
                    ids, labels, was_cut = fit_length(*encoded, cfg.max_length, cfg.truncation, cfg.min_response_tokens)
                except InvalidRow as err:
                    dropped.append({"row": row.record.row, "line": row.record.line, "reason": str(err)})
                    continue
                truncated += was_cut
                examples.append((ids, labels))
            bar.update(len(chunk))
    if not examples:
        reasons = "; ".join(f"row {d['row']}: {d['reason']}" for d in dropped[:3])
        raise UserError(f"{data_file}: no example survived ({reasons})")
    train, validation = _split(examples, cfg.validation_size, cfg.split_seed)
    elapsed = time.perf_counter() - started
    stats = _stats(data_file, records, train, validation, truncated, dropped, elapsed, key)
    with atomic_dir(out, replace=True) as tmp:
        _write_dataset(tmp / "dataset", train, validation)
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_json(tmp / "fingerprint.json", {"fingerprint": key, "data_file": str(data_file),
                                                     "tokenizer": str(tokenizer_dir), "options": vars(cfg)})
    return PreparedData(out, stats, cached=False)


def _encode_chunk(tokenizer, chunk, cfg: DataConfig):
    """Encodings for a chunk in order; an InvalidRow stands in for a row that cannot be encoded."""
    results: list = [None] * len(chunk)
    plain = [i for i, row in enumerate(chunk) if not isinstance(row, ChatRow)]
    if plain:
        encoded = encode_instructions(tokenizer, [chunk[i] for i in plain], cfg.template, cfg.response_separator)
        for i, item in zip(plain, encoded):
            results[i] = item
    for i, row in enumerate(chunk):
        if isinstance(row, ChatRow):
            try:
                results[i] = encode_chat(tokenizer, row)
            except InvalidRow as err:
                results[i] = err
    return results


def _split(examples, validation_size: float, seed: int):
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = int(validation_size) if validation_size >= 1 else round(validation_size * len(examples))
    count = min(count, len(examples) - 1)
    held = sorted(order[:count])
    kept = sorted(order[count:])
    return [examples[i] for i in kept], [examples[i] for i in held]


def _write_dataset(path: Path, train, validation) -> None:
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    features = Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32"))})

    def table(examples):
        return Dataset.from_dict(
            {"input_ids": [ids for ids, _ in examples], "labels": [labels for _, labels in examples]},
            features=features,
        )

    # datasets cannot reload an empty split, so a run without held-out rows has no validation split.
    splits = {"train": train, "validation": validation}
    DatasetDict({name: table(rows) for name, rows in splits.items() if rows}).save_to_disk(str(path))


def _percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "p50": at(0.5), "p90": at(0.9), "p95": at(0.95), "p99": at(0.99), "max": ordered[-1]}


def _stats(data_file, records, train, validation, truncated, dropped, elapsed, key) -> dict:
    everything = train + validation
    lengths = [len(ids) for ids, _ in everything]
    return {
        "source": str(data_file),
        "fingerprint": key,
        "rows_read": len(records),
        "examples": len(everything),
        "train_examples": len(train),
        "validation_examples": len(validation),
        "tokens": sum(lengths),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in labels) for _, labels in everything),
        "length_percentiles": _percentiles(lengths),
        "truncated": truncated,
        "dropped": len(dropped),
        "dropped_rows": sorted(dropped, key=lambda item: item["row"]),
        "seconds": round(elapsed, 3),
        "rows_per_second": round(len(records) / elapsed, 1) if elapsed > 0 else None,
    }


def load_prepared(path: str | Path):
    """The DatasetDict (train, validation) written by :func:`prepare` at ``path``."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "dataset"))
