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


@dataclass
class DataConfig:
    path: str = option("asset:alpaca_en_demo", help="JSON or JSONL file, or asset:NAME")
    format: Literal["auto", "alpaca", "dolly", "sharegpt", "messages"] = option(
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
    split_seed: int = option(42, help="seed of the train/validation shuffle")
    skip_invalid: bool = option(False, help="drop malformed rows (each reported) instead of failing")
    output_dir: str | None = option(
        None, help="where the tokenized dataset goes; default: the cache, keyed by fingerprint"
    )

    def __post_init__(self) -> None:
        unknown = set(self.fields) - set(CANONICAL_FIELDS)
        if unknown:
            raise ConfigError(
                f"data.fields: unknown target {sorted(unknown)[0]!r}, expected some of {', '.join(CANONICAL_FIELDS)}"
            )
        if self.validation_size >= 1 and self.validation_size != int(self.validation_size):
            raise ConfigError(f"data.validation_size: {self.validation_size} is neither a share < 1 nor a row count")

    def field_map(self) -> dict[str, str]:
        """instruction/input/output -> the file's field names."""
        preset = PRESET_FIELDS.get(self.format, PRESET_FIELDS["alpaca"])
        return {**preset, **self.fields}
