"""The ``data:`` section of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sift_llm.schema import ConfigError, option

CANONICAL_FIELDS = ("instruction", "input", "output")

# Field maps of well-known instruction corpora onto Alpaca's instruction / input / output.
PRESET_FIELDS = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
    "dolly": {"instruction": "instruction", "input": "context", "output": "response"},
}

Format = Literal["auto", "alpaca", "dolly", "sharegpt", "messages"]
PATH_HELP = (
    "JSON or JSONL file, Parquet or CSV file, a save_to_disk directory, hf:ORG/NAME (datasets.load_dataset; "
    "offline from the local datasets cache with HF_HUB_OFFLINE=1) or asset:NAME; a list mixes several sources"
)


@dataclass
class SourceConfig:
    """One corpus of a mixture (``data.sources``); unset keys take the ``data:`` section's value."""

    path: str = option(help=PATH_HELP.split("; a list")[0])
    name: str | None = option(None, help="label of this source in stats.json and errors (default: the path)")
    format: Format | None = option(None, help="record format of this source (default: data.format)")
    fields: dict[str, str] | None = option(None, help="field map of this source (default: data.fields)")
    split: str | None = option(None, help="split of an hf: dataset or a save_to_disk DatasetDict (default: data.split)")
    hf_config: str | None = option(None, help="configuration (subset) name of an hf: dataset (default: data.hf_config)")
    samples: int | None = option(
        None, min=1, help="rows drawn from this source (seeded by data.mix_seed); more than it has repeats rows"
    )
    ratio: float | None = option(
        None, min=0, min_exclusive=True, help="rows drawn as a multiple of the source's rows (0.5: half, 2: each twice)"
    )

    def __post_init__(self) -> None:
        if self.samples is not None and self.ratio is not None:
            raise ConfigError("samples and ratio are exclusive; set one of them")
        if self.fields is not None:
            _check_fields(self.fields, "fields")


@dataclass
class DataConfig:
    path: str | list[str] = option("asset:alpaca_en_demo", help=PATH_HELP)
    sources: list[SourceConfig] = option(
        default_factory=list,
        help="a mixture: [{path, samples | ratio, format, fields, split, hf_config, name}, ...]; replaces data.path",
    )
    mix_seed: int = option(42, help="seed of the per-source sampling (samples / ratio)")
    split: str = option("train", help="split read from an hf: dataset or a save_to_disk DatasetDict")
    hf_config: str | None = option(None, help="configuration (subset) name of an hf: dataset")
    format: Format = option(
        "auto",
        help="auto detects chat records (conversations / messages) and otherwise reads instruction records",
    )
    fields: dict[str, str] = option(
        default_factory=dict,
        help="map instruction/input/output onto the file's own field names, e.g. {output: response}",
    )
    template: Literal["alpaca"] = option("alpaca", help="prompt template for instruction records")
    response_separator: str = option(
        "", help="text between '### Response:' and the output; stanford_alpaca uses none"
    )
    chat_template: str | None = option(
        None,
        help="Jinja chat template file used instead of the tokenizer's (e.g. one that renders tools); "
        "its text, not its path, is part of the fingerprint",
    )
    assistant_first: Literal["drop_turns", "invalid"] = option(
        "drop_turns",
        help="chat turns by the assistant before the first user turn: drop them (FastChat's rule; counted in "
        "stats.json) or report the conversation as invalid",
    )
    max_length: int = option(512, min=8, help="tokens per example, prompt + response + EOS")
    truncation: Literal["truncate_response", "drop"] = option(
        "truncate_response",
        help="over-long rows: cut the response's tail (rows whose prompt alone is too long are dropped), or drop",
    )
    min_response_tokens: int = option(
        1, min=1, help="a truncated row must keep at least this many response tokens, else it is dropped"
    )
    validation_size: float = option(
        0.05, min=0, help="held-out share (< 1) or row count (>= 1) for the validation split"
    )
    split_seed: int = option(42, help="seed of the train/validation shuffle and of the packing order")
    packing: bool = option(
        False,
        help="fill each max_length train sequence with whole examples (position ids restart per example, "
        "attention stays inside it); the validation split is never packed",
    )
    skip_invalid: bool = option(False, help="drop malformed rows (each reported) instead of failing")
    output_dir: str | None = option(
        None, help="where the tokenized dataset goes; default: the cache, keyed by fingerprint"
    )

    def __post_init__(self) -> None:
        _check_fields(self.fields, "data.fields")
        if self.validation_size >= 1 and self.validation_size != int(self.validation_size):
            raise ConfigError(f"data.validation_size: {self.validation_size} is neither a share < 1 nor a row count")
        if isinstance(self.path, list) and not self.path:
            raise ConfigError("data.path: an empty list names no source")

    def field_map(self, format: str | None = None, fields: dict[str, str] | None = None) -> dict[str, str]:
        """instruction/input/output -> the file's field names."""
        format = format or self.format
        preset = PRESET_FIELDS.get(format, PRESET_FIELDS["alpaca"])
        return {**preset, **(self.fields if fields is None else fields)}

    def source_list(self) -> list[SourceConfig]:
        """The sources to read: ``data.sources``, else each ``data.path``, with the section's defaults filled in."""
        if self.sources:
            listed = self.sources
        else:
            paths = self.path if isinstance(self.path, list) else [self.path]
            listed = [SourceConfig(path=p) for p in paths]
        out = []
        for source in listed:
            out.append(SourceConfig(
                path=source.path,
                name=source.name or source.path,
                format=source.format or self.format,
                fields=self.fields if source.fields is None else source.fields,
                split=source.split or self.split,
                hf_config=source.hf_config if source.hf_config is not None else self.hf_config,
                samples=source.samples,
                ratio=source.ratio,
            ))
        names = [s.name for s in out]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"data.sources: two sources are both named {duplicate!r}; give them distinct names")
        return out


def _check_fields(fields: dict[str, str], where: str) -> None:
    unknown = set(fields) - set(CANONICAL_FIELDS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown target {sorted(unknown)[0]!r}, expected some of {', '.join(CANONICAL_FIELDS)}"
        )

