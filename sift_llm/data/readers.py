"""Read instruction and chat records from JSON or JSONL, keeping each record's file line for errors."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError

CHAT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MAX_LISTED = 5


@dataclass(frozen=True)
class Record:
    row: int  # 1-based position among the file's records
    line: int  # 1-based line where the record starts
    data: Any


@dataclass(frozen=True)
class InstructionRow:
    record: Record
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class ChatRow:
    record: Record
    messages: list[dict[str, str]]


class InvalidRow(Exception):
    """A record that cannot become an example; the message says why."""


def read_records(path: Path) -> list[Record]:
    """Every record of a JSON array or JSONL file, with its row and line numbers."""
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    if text.lstrip().startswith("["):
        records = _read_array(path, text)
    else:
        records = _read_lines(path, text)
    if not records:
        raise UserError(f"{path}: holds no records")
    return records


def _read_lines(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON line ({err.msg} at column {err.colno})") from None
        records.append(Record(row=len(records) + 1, line=number, data=data))
    return records


def _read_array(path: Path, text: str) -> list[Record]:
    """Decode a top-level JSON array element by element so each record knows its line."""
    newlines = [i for i, ch in enumerate(text) if ch == "\n"]

    def line_of(offset: int) -> int:
        return bisect.bisect_right(newlines, offset - 1) + 1

    decoder = json.JSONDecoder()
    records: list[Record] = []
    pos = _skip_space(text, text.index("[") + 1)
    if pos < len(text) and text[pos] == "]":
        return records
    while True:
        try:
            data, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: invalid JSON ({err.msg} at column {err.colno})") from None
        records.append(Record(row=len(records) + 1, line=line_of(pos), data=data))
        pos = _skip_space(text, end)
        if pos >= len(text):
            raise UserError(f"{path}:{line_of(pos)}: invalid JSON (the array is not closed)")
        if text[pos] == "]":
            if _skip_space(text, pos + 1) < len(text):
                raise UserError(f"{path}:{line_of(pos + 1)}: invalid JSON (extra data after the array)")
            return records
        if text[pos] != ",":
            raise UserError(f"{path}:{line_of(pos)}: invalid JSON (expected ',' or ']' between records)")
        pos = _skip_space(text, pos + 1)


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def detect_format(record: Record) -> str:
    if isinstance(record.data, dict):
        if "conversations" in record.data:
            return "sharegpt"
        if "messages" in record.data:
            return "messages"
    return "alpaca"


def to_instruction(record: Record, fields: dict[str, str]) -> InstructionRow:
    data = record.data
    if not isinstance(data, dict):
        raise InvalidRow(f"expected a JSON object, got {type(data).__name__}")
    values = {}
    for target, source in fields.items():
        value = data.get(source)
        if target == "input":
            if value is None:
                value = ""
            if not isinstance(value, str):
                raise InvalidRow(f"field {source!r} must be a string, got {type(value).__name__}")
        elif not isinstance(value, str) or not value.strip():
            state = "missing" if source not in data else "empty" if isinstance(value, str) else "not a string"
            raise InvalidRow(f"required field {source!r} is {state}")
        values[target] = value
    return InstructionRow(record, values["instruction"], values["input"], values["output"])


def to_chat(record: Record, format: str) -> ChatRow:
    data = record.data
    key, role_key, content_key = (
        ("conversations", "from", "value") if format == "sharegpt" else ("messages", "role", "content")
    )
    if not isinstance(data, dict) or not isinstance(data.get(key), list) or not data[key]:
        raise InvalidRow(f"required field {key!r} is missing or not a non-empty list")
    messages = []
    for turn_number, turn in enumerate(data[key], start=1):
        if not isinstance(turn, dict):
            raise InvalidRow(f"{key}[{turn_number}] is not an object")
        role = CHAT_ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise InvalidRow(
                f"{key}[{turn_number}].{role_key} is {turn.get(role_key)!r}, expected one of {', '.join(CHAT_ROLES)}"
            )
        content = turn.get(content_key)
        if not isinstance(content, str) or not content.strip():
            raise InvalidRow(f"{key}[{turn_number}].{content_key} is missing or empty")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRow("the conversation has no assistant turn to learn from")
    return ChatRow(record, messages)


def parse_rows(path: Path, records: list[Record], format: str, fields: dict[str, str], skip_invalid: bool):
    """Typed rows plus the invalid ones as (record, reason); raises listing the first few unless skipping."""
    rows, invalid = [], []
    for record in records:
        kind = detect_format(record) if format == "auto" else format
        try:
            rows.append(to_chat(record, kind) if kind in ("sharegpt", "messages") else to_instruction(record, fields))
        except InvalidRow as err:
            invalid.append((record, str(err)))
    if invalid and not skip_invalid:
        listed = "\n".join(f"  row {r.row} (line {r.line}): {reason}" for r, reason in invalid[:MAX_LISTED])
        more = f"\n  ... and {len(invalid) - MAX_LISTED} more" if len(invalid) > MAX_LISTED else ""
        raise UserError(
            f"{path}: {len(invalid)} of {len(records)} rows are invalid:\n{listed}{more}\n"
            "fix them, or pass --skip-invalid (data.skip_invalid=true) to drop and report them"
        )
    return rows, invalid
