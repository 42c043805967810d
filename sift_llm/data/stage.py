"""Run the data stage: read, validate, encode, truncate, mix, split, pack and write a fingerprinted dataset."""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sift_llm import assets
from sift_llm.data.config import DataConfig
from sift_llm.data.encode import IGNORE_INDEX, ChatEncoder, Tokenize, encode_instructions, fit_length
from sift_llm.data.packing import pack, packing_stats
from sift_llm.data.readers import ChatRow, InvalidRow, parse_rows
from sift_llm.data.sources import Source, draw, open_source
from sift_llm.errors import UserError
from sift_llm.fsio import atomic_dir, atomic_write_json
from sift_llm.runtime import progress

# Bump when the encoding changes, so cached datasets built by older code are not reused.
DATA_FORMAT_VERSION = 2
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
ENCODE_CHUNK = 2048
# Options that name places (hashed by content instead) or only say where the output goes.
UNHASHED = ("path", "sources", "output_dir", "chat_template")


@dataclass
class PreparedData:
    path: Path  # holds dataset/ (HF DatasetDict: train and, when non-empty, validation), stats.json, fingerprint.json
    stats: dict
    cached: bool

    @property
    def dataset_path(self) -> Path:
        return self.path / "dataset"


@dataclass
class Example:
    ids: list[int]
    labels: list[int]
    copies: int  # times the mixture draws it (1 unless a source is sampled with repetition)
    source: int


def fingerprint(cfg: DataConfig, sources: list[Source], tokenizer_dir: Path, chat_template: str | None) -> str:
    """Identity of the output: input bytes, tokenizer files, chat template text, and every option that changes
    the examples. Free of paths and of anything machine-specific, so every node of a multi-node run that builds
    the dataset itself computes the same fingerprint."""
    digest = hashlib.sha256()
    digest.update(f"format-version={DATA_FORMAT_VERSION}\n".encode())
    for source in sources:
        spec = {k: v for k, v in asdict(source.spec).items() if k not in ("path", "name")}
        digest.update(json.dumps({"kind": source.kind, **spec}, sort_keys=True).encode())
        digest.update(source.digest.encode() + b"\n")
    for name in TOKENIZER_FILES:
        candidate = tokenizer_dir / name
        if candidate.is_file():
            digest.update(name.encode() + b"\0" + candidate.read_bytes())
    if chat_template is not None:
        digest.update(b"chat_template\0" + chat_template.encode())
    options = {k: v for k, v in vars(cfg).items() if k not in UNHASHED}
    digest.update(json.dumps(options, sort_keys=True).encode())
    return digest.hexdigest()


def _chat_template(cfg: DataConfig) -> str | None:
    if cfg.chat_template is None:
        return None
    path = assets.resolve(cfg.chat_template)
    if not path.is_file():
        raise UserError(f"data.chat_template: {path}: no such file")
    return path.read_text(encoding="utf-8")


def prepare(cfg: DataConfig, tokenizer_dir: str | Path) -> PreparedData:
    """Build (or reuse, when the fingerprint matches) the tokenized dataset described by ``cfg``."""
    tokenizer_dir = assets.resolve(str(tokenizer_dir))
    specs = cfg.source_list()
    sources = [open_source(spec) for spec in specs]
    chat_template = _chat_template(cfg)
    key = fingerprint(cfg, sources, tokenizer_dir, chat_template)
    out = Path(cfg.output_dir).expanduser() if cfg.output_dir else assets.cache_dir() / "datasets" / key[:16]
    stamp = out / "fingerprint.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == key:
        return PreparedData(out, json.loads((out / "stats.json").read_text()), cached=True)

    started = time.perf_counter()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    encode_started, encode_cpu = time.perf_counter(), time.process_time()
    tokenize = Tokenize(tokenizer)
    chat = ChatEncoder(tokenizer, tokenize, label=str(tokenizer_dir))
    examples: list[Example] = []
    dropped: list[dict] = []
    per_source = []
    for index, source in enumerate(sources):
        per_source.append(_read_source(index, source, cfg, tokenizer, tokenize, chat, examples, dropped, len(sources)))
    encode_seconds, encode_cpu = time.perf_counter() - encode_started, time.process_time() - encode_cpu
    if not examples:
        reasons = "; ".join(f"row {d['row']}: {d['reason']}" for d in dropped[:3])
        where = sources[0].where if len(sources) == 1 else "the mixture"
        raise UserError(f"{where}: no example survived ({reasons})")
    train, validation = _split(examples, cfg.validation_size, cfg.split_seed)
    train_rows = [{"input_ids": e.ids, "labels": e.labels} for e in train]
    packing = None
    if cfg.packing:
        train_rows = pack([(e.ids, e.labels) for e in train], cfg.max_length, cfg.split_seed)
        packing = packing_stats(train_rows, len(train), cfg.max_length)
    elapsed = time.perf_counter() - started
    rows_read = sum(s["rows_read"] for s in per_source)
    stats = _stats(sources, rows_read, train, validation, dropped, per_source, packing, key)
    stats["seconds"] = round(elapsed, 3)
    stats["rows_per_second"] = round(rows_read / elapsed, 1) if elapsed > 0 else None
    rows_encoded = sum(s["rows_drawn_distinct"] for s in per_source)
    stats["encode"] = {
        "rows": rows_encoded, "seconds": round(encode_seconds, 3), "cpu_seconds": round(encode_cpu, 3),
        "rows_per_second": round(rows_encoded / encode_seconds, 1) if encode_seconds > 0 else None,
        "fast_tokenizer_backend": tokenize.backend is not None,
        "chat_single_render_rows": chat.fast_rows, "chat_prefix_render_rows": chat.prefix_rows,
    }
    with atomic_dir(out, replace=True) as tmp:
        _write_dataset(tmp / "dataset", train_rows, [{"input_ids": e.ids, "labels": e.labels} for e in validation])
        atomic_write_json(tmp / "stats.json", stats)
        atomic_write_json(tmp / "fingerprint.json", {
            "fingerprint": key, "sources": [s.where for s in sources], "tokenizer": str(tokenizer_dir),
            "options": vars(cfg)})
    return PreparedData(out, stats, cached=False)


def _read_source(index, source: Source, cfg: DataConfig, tokenizer, tokenize, chat, examples, dropped, count) -> dict:
    """Parse, encode and fit one source's drawn rows into ``examples``; returns its stats entry."""
    spec = source.spec
    records = source.records()
    copies = draw(len(records), spec, cfg.mix_seed * 1_000_003 + index)
    drawn = [r for r, c in zip(records, copies) if c]
    copies_of = {r.row: c for r, c in zip(records, copies) if c}
    rows, invalid = parse_rows(source.where, drawn, spec.format, cfg.field_map(spec.format, spec.fields),
                               cfg.skip_invalid, cfg.assistant_first)
    label = {"source": spec.name} if count > 1 else {}

    def drop(record, reason):
        dropped.append({**label, "row": record.row, "line": record.line, "reason": reason})

    for record, why in invalid:
        drop(record, f"invalid: {why}")
    entry = {"name": spec.name, "path": spec.path, "kind": source.kind, "rows_read": len(records),
             "rows_drawn": sum(copies), "rows_drawn_distinct": len(drawn), "examples": 0, "tokens": 0,
             "target_tokens": 0, "truncated": 0, "dropped": len(invalid),
             "leading_turns_dropped": sum(r.leading_dropped for r in rows if isinstance(r, ChatRow)),
             "trailing_turns_dropped": sum(r.trailing_dropped for r in rows if isinstance(r, ChatRow))}
    if any(isinstance(r, ChatRow) for r in rows) and not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"{source.where}: chat records need a chat template, and the tokenizer has none; set data.chat_template")
    where = (lambda row: f"{source.where}: {row.record.where}")
    with progress(total=len(rows), desc=f"tokenize {spec.name}" if count > 1 else "tokenize", unit="row") as bar:
        for start in range(0, len(rows), ENCODE_CHUNK):
            chunk = rows[start : start + ENCODE_CHUNK]
            for row, encoded in zip(chunk, _encode_chunk(tokenizer, tokenize, chat, chunk, cfg, where)):
                try:
                    if isinstance(encoded, InvalidRow):
                        raise encoded
                    ids, labels, was_cut = fit_length(*encoded, cfg.max_length, cfg.truncation, cfg.min_response_tokens)
                except InvalidRow as err:
                    drop(row.record, str(err))
                    entry["dropped"] += 1
                    continue
                n = copies_of[row.record.row]
                entry["truncated"] += was_cut * n
                entry["examples"] += n
                entry["tokens"] += len(ids) * n
                entry["target_tokens"] += sum(label != IGNORE_INDEX for label in labels) * n
                examples.append(Example(ids, labels, n, index))
            bar.update(len(chunk))
    return entry


def _encode_chunk(tokenizer, tokenize, chat: ChatEncoder, chunk, cfg: DataConfig, where):
    """Encodings for a chunk in order; an InvalidRow stands in for a row that cannot be encoded."""
    results: list = [None] * len(chunk)
    plain = [i for i, row in enumerate(chunk) if not isinstance(row, ChatRow)]
    if plain:
        encoded = encode_instructions(tokenizer, [chunk[i] for i in plain], cfg.template, cfg.response_separator,
                                      tokenize)
        for i, item in zip(plain, encoded):
            results[i] = item
    chats = [i for i, row in enumerate(chunk) if isinstance(row, ChatRow)]
    if chats:
        for i, item in zip(chats, chat.encode([chunk[i] for i in chats], where)):
            results[i] = item
    return results


def _split(examples: list[Example], validation_size: float, seed: int):
    """Held-out examples by a seeded shuffle of the distinct examples; train gets every copy of the others."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    count = int(validation_size) if validation_size >= 1 else round(validation_size * len(examples))
    count = min(count, len(examples) - 1)
    held = set(order[:count])
    validation = [examples[i] for i in sorted(held)]
    train = [examples[i] for i in range(len(examples)) if i not in held for _ in range(examples[i].copies)]
    return train, validation


def _write_dataset(path: Path, train: list[dict], validation: list[dict]) -> None:
    from datasets import Dataset, DatasetDict, Features, Sequence, Value

    def table(rows):
        columns = list(rows[0])
        features = Features({name: Sequence(Value("int32")) for name in columns})
        return Dataset.from_dict({name: [row[name] for row in rows] for name in columns}, features=features)

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


def _stats(sources, rows_read, train, validation, dropped, per_source, packing, key) -> dict:
    everything = train + validation
    lengths = [len(e.ids) for e in everything]
    per_source = [{k: v for k, v in entry.items() if k != "rows_drawn_distinct"} | {
        "train_examples": sum(e.source == i for e in train),
        "validation_examples": sum(e.source == i for e in validation)} for i, entry in enumerate(per_source)]
    return {
        "source": sources[0].where if len(sources) == 1 else [s.spec.name for s in sources],
        "fingerprint": key,
        "rows_read": rows_read,
        "examples": len(everything),
        "train_examples": len(train),
        "validation_examples": len(validation),
        "tokens": sum(lengths),
        "target_tokens": sum(sum(label != IGNORE_INDEX for label in e.labels) for e in everything),
        "length_percentiles": _percentiles(lengths),
        "truncated": sum(s["truncated"] for s in per_source),
        "dropped": len(dropped),
        "dropped_rows": sorted(dropped, key=lambda item: (item.get("source", ""), item["row"])),
        "packing": packing,
        "sources": per_source,
    }


def load_prepared(path: str | Path):
    """The DatasetDict (train, validation) written by :func:`prepare` at ``path``."""
    from datasets import load_from_disk

    return load_from_disk(str(Path(path) / "dataset"))
