"""Where records come from: JSON / JSONL files (with line numbers), Parquet and CSV files, ``save_to_disk``
directories and Hugging Face datasets (``hf:ORG/NAME``), plus the seeded per-source draw of a mixture.

Tables and datasets are read with the datasets library (``load_dataset`` for hf:, Parquet and CSV;
``load_from_disk`` for directories), so a hub dataset loads offline from the local datasets cache exactly as
the library does (``HF_HUB_OFFLINE=1`` skips the network). Each source has a content digest for the
fingerprint: the file's bytes, or the bytes of the dataset's Arrow files; never a path, so two machines that
hold the same data compute the same fingerprint.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift_llm import assets
from sift_llm.data.config import SourceConfig
from sift_llm.data.readers import Record, read_records
from sift_llm.errors import UserError
from sift_llm.fsio import file_sha256

HF_PREFIX = "hf:"
JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "csv"}


@dataclass
class Source:
    spec: SourceConfig
    kind: str  # json, parquet, csv, disk, hf
    where: str  # what errors name: the file's path, or hf:NAME
    digest: str
    raw: bytes | None = None  # the JSON file's bytes (read once, for the digest and the records)
    dataset: Any = None  # a datasets.Dataset for tables (loaded when the records are read), directories and hf:
    _records: list[Record] | None = field(default=None, repr=False)

    def records(self) -> list[Record]:
        if self._records is None:
            if self.kind == "json":
                self._records = read_records(Path(self.where), self.raw)
            else:
                if self.dataset is None:
                    path = Path(self.where)
                    self.dataset = _load_table(path, self.kind, path.suffix.lower())
                self._records = [Record(row=i, line=None, data=data)
                                 for i, data in enumerate(self.dataset.to_list(), start=1)]
                if not self._records:
                    raise UserError(f"{self.where}: holds no records")
        return self._records


def open_source(spec: SourceConfig) -> Source:
    """Locate and fingerprint one source; a missing or unreadable source is a UserError naming it."""
    if spec.path.startswith(HF_PREFIX):
        name = spec.path[len(HF_PREFIX):]
        if not name:
            raise UserError(f"{spec.path!r}: expected hf:ORG/NAME (a Hugging Face dataset)")
        dataset = _load_hf(name, spec)
        return Source(spec, "hf", spec.path, _dataset_digest(dataset), dataset=dataset)
    path = assets.resolve(spec.path)
    if path.is_dir():
        dataset = _load_disk(path, spec.split)
        return Source(spec, "disk", str(path), _dataset_digest(dataset), dataset=dataset)
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in TABLE_SUFFIXES:
        kind = TABLE_SUFFIXES[suffix]
        digest = file_sha256(path)  # streamed: the table itself is read only on a cache miss
        return Source(spec, kind, str(path), digest)  # a cached result then never pays for loading the table
    raw = path.read_bytes()
    return Source(spec, "json", str(path), hashlib.sha256(raw).hexdigest(), raw=raw)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _load_hf(name: str, spec: SourceConfig):
    import datasets

    try:
        loaded = datasets.load_dataset(name, name=spec.hf_config, split=spec.split)
    except Exception as err:  # the library raises many types (hub, network, builder, split); all are the user's to fix
        hint = ("; without network access set HF_HUB_OFFLINE=1 so the local datasets cache is used"
                if isinstance(err, (ConnectionError, OSError)) else "")
        raise UserError(
            f"hf:{name} (split {spec.split!r}{', config ' + repr(spec.hf_config) if spec.hf_config else ''}): "
            f"cannot load the dataset: {_first_line(err)}{hint}"
        ) from None
    if not isinstance(loaded, datasets.Dataset):
        raise UserError(f"hf:{name}: expected one split, got a {type(loaded).__name__}")
    return loaded


def _load_disk(path: Path, split: str):
    import datasets

    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        raise UserError(
            f"{path}: a directory, but not one written by save_to_disk (no dataset_dict.json or state.json); "
            f"name a file, or use hf:{path} for a dataset repository layout"
        )
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as err:
        raise UserError(f"{path}: cannot load the saved dataset: {_first_line(err)}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{path}: no split {split!r} (it has {', '.join(loaded)}); set data.split")
        loaded = loaded[split]
    return loaded


def _load_table(path: Path, kind: str, suffix: str):
    import datasets

    options: dict = {}
    if kind == "csv":
        # Empty cells stay empty strings (not NaN), and every column is read as text.
        options = {"na_filter": False, "sep": "\t" if suffix == ".tsv" else ","}
    try:
        loaded = datasets.load_dataset(kind, data_files=str(path), split="train", **options)
    except Exception as err:
        raise UserError(f"{path}: cannot read it as {kind.upper()}: {_first_line(err)}") from None
    if kind == "csv":
        loaded = loaded.cast(datasets.Features({c: datasets.Value("string") for c in loaded.column_names}))
    return loaded


def _dataset_digest(dataset) -> str:
    """sha256 of the dataset's Arrow data: its cache files' bytes, or the in-memory table serialized."""
    digest = hashlib.sha256()
    files = [entry["filename"] for entry in dataset.cache_files]
    if files and dataset._indices is None:
        for name in files:
            with open(name, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    else:
        import pyarrow as pa

        table = dataset.with_format("arrow")[:]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.combine_chunks())
        digest.update(sink.getvalue().to_pybytes())
    return digest.hexdigest()


def draw(count: int, spec: SourceConfig, seed: int) -> list[int]:
    """Copies of each of ``count`` rows in the mixture: 1 each, or a seeded draw of ``samples`` /
    ``ratio * count`` rows (whole passes when more rows are asked for than the source has, then a sample)."""
    if spec.samples is None and spec.ratio is None:
        return [1] * count
    target = spec.samples if spec.samples is not None else round(spec.ratio * count)
    if target == 0:
        raise UserError(f"source {spec.name}: ratio {spec.ratio} of its {count} rows draws no row")
    whole, rest = divmod(target, count)
    copies = [whole] * count
    for index in random.Random(seed).sample(range(count), rest):
        copies[index] += 1
    return copies
