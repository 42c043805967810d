"""Records from JSON / JSONL files and typed rows from records: instruction rows and chat rows.

A record knows its 1-based row and, for JSON files, the line it starts on, so every error names a place. Every
record-level problem becomes an :class:`InvalidRow` with a reason; nothing a record holds may raise anything
else. Chat records come in two shapes, normalised to the message dicts that Hugging Face chat templates take:

* ShareGPT: ``conversations: [{from, value}]`` with roles human / gpt / system (and chatgpt / bing / bard as
  assistant aliases), tool calls as ``function_call`` turns whose value is the JSON call and tool results as
  ``observation`` turns (LLaMA-Factory's and glaive's layout), with optional top-level ``system`` and ``tools``.
* OpenAI messages: ``messages: [{role, content}]``, ``content`` a string or a list of content parts (text parts
  are joined with a newline; any other part is invalid), assistant ``tool_calls`` and ``tool`` messages, and a
  top-level ``tools`` list.

Tool calls become ``{"type": "function", "function": {"name", "arguments": dict}}`` and tools become
``{"type": "function", "function": {...}}``, the forms transformers' chat templates document.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sift_llm.errors import UserError

ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "model": "assistant",
    "system": "system", "developer": "system",
    "function_call": "tool_call",
    "observation": "tool", "tool": "tool", "function": "tool",
}
TEXT_PARTS = ("text", "input_text", "output_text")
MAX_LISTED = 5
JSON_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Record:
    row: int  # 1-based position among the source's records
    line: int | None  # 1-based line where the record starts (JSON files); None for tables and datasets
    data: Any

    @property
    def where(self) -> str:
        return f"row {self.row}" + (f" (line {self.line})" if self.line is not None else "")


@dataclass(frozen=True)
class InstructionRow:
    record: Record
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class ChatRow:
    record: Record
    messages: list[dict]
    tools: list[dict] | None = None
    leading_dropped: int = 0  # assistant / tool turns before the first user turn, dropped
    trailing_dropped: int = 0  # turns after the last assistant turn (nothing is learned from them), dropped
    notes: dict = field(default_factory=dict)

    @property
    def uses_tools(self) -> bool:
        return bool(self.tools) or any(m.get("tool_calls") or m["role"] == "tool" for m in self.messages)


class InvalidRow(Exception):
    """A record that cannot become an example; the message says why."""


# ----------------------------------------------------------------------------------------------------- files


def read_records(path: Path, raw: bytes | None = None) -> list[Record]:
    """Every record of a JSON array or JSONL file, with its row and line numbers."""
    if raw is None:
        if not path.is_file():
            raise UserError(f"{path}: no such data file")
        raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte {err.start}: {err.reason})") from None
    if not text.strip(JSON_SPACE):
        raise UserError(f"{path}: the file is empty")
    if text.lstrip(JSON_SPACE).startswith("["):
        records = _read_array(path, text)
    else:
        records = _read_lines(path, text)
    if not records:
        raise UserError(f"{path}: holds no records")
    return records


def _read_lines(path: Path, text: str) -> list[Record]:
    """JSONL: records end at "\\n" only. ``str.splitlines`` would also split at U+2028, U+2029, U+0085,
    \\x0b, \\x0c and \\x1c-\\x1e, which real web text carries inside JSON strings."""
    records = []
    decode = json.loads
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip(JSON_SPACE):
            continue
        try:
            data = decode(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: invalid JSON line ({err.msg} at column {err.colno})") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: the JSON is nested too deeply to read") from None
        records.append(Record(row=len(records) + 1, line=number, data=data))
    return records


def _read_array(path: Path, text: str) -> list[Record]:
    """Decode a top-level JSON array element by element so each record knows its line."""
    counted_to, line = 0, 1

    def line_of(offset: int) -> int:  # offsets only grow, so counting newlines incrementally is linear overall
        nonlocal counted_to, line
        line += text.count("\n", counted_to, offset)
        counted_to = offset
        return line

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
        except RecursionError:
            raise UserError(f"{path}:{line_of(pos)}: the JSON is nested too deeply to read") from None
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
    while pos < len(text) and text[pos] in JSON_SPACE:
        pos += 1
    return pos


# ----------------------------------------------------------------------------------------------------- rows


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
            state = "missing" if value is None else "empty" if isinstance(value, str) else "not a string"
            raise InvalidRow(f"required field {source!r} is {state}")
        values[target] = value
    return InstructionRow(record, values["instruction"], values["input"], values["output"])


def to_chat(record: Record, format: str, assistant_first: str = "drop_turns") -> ChatRow:
    """A ShareGPT or OpenAI-messages record as normalised chat messages (see the module docstring)."""
    data = record.data
    key = "conversations" if format == "sharegpt" else "messages"
    role_keys, content_keys = (("from", "role"), ("value", "content")) if key == "conversations" else (
        ("role", "from"), ("content", "value"))
    if not isinstance(data, dict):
        raise InvalidRow(f"expected a JSON object, got {type(data).__name__}")
    turns = data.get(key)
    if not isinstance(turns, list):
        state = "missing" if turns is None else f"a {type(turns).__name__}, not a list"
        raise InvalidRow(f"required field {key!r} is {state}")
    if not turns:
        raise InvalidRow(f"{key!r} is an empty list")
    messages = []
    system = data.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise InvalidRow(f"field 'system' must be a string, got {type(system).__name__}")
        if system.strip():
            messages.append({"role": "system", "content": system})
    offset = len(messages)  # a top-level system prompt is not one of the turns
    for number, turn in enumerate(turns, start=1):
        where = f"{key}[{number}]"
        if not isinstance(turn, dict):
            raise InvalidRow(f"{where} is a {type(turn).__name__}, not an object")
        role_key = next((k for k in role_keys if turn.get(k) is not None), role_keys[0])
        content_key = next((k for k in content_keys if k in turn), content_keys[0])
        raw_role = turn.get(role_key)
        role = ROLES.get(raw_role.lower()) if isinstance(raw_role, str) else None
        if role is None:
            raise InvalidRow(f"{where}.{role_key} is {raw_role!r}, expected one of {', '.join(ROLES)}")
        messages.append(_message(role, turn, content_key, where))
    return _finish(record, messages, _tools(data.get("tools")), assistant_first, key, offset)


def _message(role: str, turn: dict, content_key: str, where: str) -> dict:
    content = turn.get(content_key)
    if role == "tool_call":  # ShareGPT: the value is the call (or a list of calls) as JSON
        calls = content
        if isinstance(calls, str):
            try:
                calls = json.loads(calls)
            except json.JSONDecodeError as err:
                raise InvalidRow(f"{where}.{content_key} is not a JSON tool call ({err.msg})") from None
        calls = calls if isinstance(calls, list) else [calls]
        return {"role": "assistant", "content": "", "tool_calls": [_call(c, f"{where}.{content_key}") for c in calls]}
    calls = turn.get("tool_calls")
    if calls is not None and role != "assistant":
        raise InvalidRow(f"{where} has tool_calls but its role is {role!r}; only the assistant calls tools")
    if calls is not None:
        if not isinstance(calls, list):
            raise InvalidRow(f"{where}.tool_calls is a {type(calls).__name__}, not a list")
        text = "" if content is None else _text(content, f"{where}.{content_key}")
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls, 1)]
        elif not text.strip():
            raise InvalidRow(f"{where}.{content_key} is missing or empty")
        return message
    if content is None:
        raise InvalidRow(f"{where}.{content_key} is missing")
    text = _text(content, f"{where}.{content_key}")
    if not text.strip():
        raise InvalidRow(f"{where}.{content_key} is empty")
    message = {"role": role, "content": text}
    if role == "tool":
        for extra in ("tool_call_id", "name"):
            if isinstance(turn.get(extra), str):
                message[extra] = turn[extra]
    return message


def _text(content: Any, where: str) -> str:
    """A turn's text: a string, or OpenAI content parts whose text parts are joined with a newline."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content, start=1):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in TEXT_PARTS and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part, dict) and kind is not None:
                raise InvalidRow(f"{where}[{number}] is a {kind!r} part; only text parts can be learned by a text model")
            else:
                raise InvalidRow(f"{where}[{number}] is not a content part ({{type: text, text: ...}})")
        return "\n".join(texts)
    raise InvalidRow(f"{where} must be a string or a list of content parts, got {type(content).__name__}")


def _call(call: Any, where: str) -> dict:
    """One tool call, OpenAI (``{id, type, function: {name, arguments}}``) or flat (``{name, arguments}``)."""
    if not isinstance(call, dict):
        raise InvalidRow(f"{where}: a tool call must be an object, got {type(call).__name__}")
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidRow(f"{where}: the tool call has no function name")
    arguments = function.get("arguments", function.get("parameters", {}))
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as err:
            raise InvalidRow(f"{where}: the arguments of {name!r} are not JSON ({err.msg})") from None
    if not isinstance(arguments, dict):
        raise InvalidRow(f"{where}: the arguments of {name!r} must be a JSON object, got {type(arguments).__name__}")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def _tools(tools: Any) -> list[dict] | None:
    """The record's tool definitions as ``[{type: function, function: {...}}]``, or None."""
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise InvalidRow(f"field 'tools' is not JSON ({err.msg})") from None
    tools = [tools] if isinstance(tools, dict) else tools
    if not isinstance(tools, list):
        raise InvalidRow(f"field 'tools' must be a list of tool definitions, got {type(tools).__name__}")
    out = []
    for number, tool in enumerate(tools, start=1):
        if not isinstance(tool, dict):
            raise InvalidRow(f"tools[{number}] is a {type(tool).__name__}, not an object")
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            raise InvalidRow(f"tools[{number}] has no function name")
        out.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return out or None


def _finish(record: Record, messages: list[dict], tools: list[dict] | None, assistant_first: str, key: str,
            offset: int) -> ChatRow:
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        kinds = sorted(set(roles))
        only = f" (it holds only {'/'.join(kinds)} turns)" if kinds else ""
        raise InvalidRow(f"the conversation has no assistant turn to learn from{only}")
    first_user = roles.index("user") if "user" in roles else len(roles)
    leading = [i for i in range(first_user) if roles[i] != "system"]
    if leading:
        if assistant_first == "invalid" or first_user == len(roles):
            raise InvalidRow(
                f"{key}[{leading[0] + 1 - offset}] ({roles[leading[0]]}) comes before any user turn"
                + ("" if first_user < len(roles) else " and no user turn follows")
                + ("; data.assistant_first=drop_turns drops such turns" if first_user < len(roles) else "")
            )
        messages = [m for i, m in enumerate(messages) if i not in set(leading)]
        roles = [m["role"] for m in messages]
        if "assistant" not in roles:
            raise InvalidRow("after dropping the assistant turns before the first user turn, none is left to learn")
    last = len(roles) - 1 - roles[::-1].index("assistant")
    trailing = len(messages) - 1 - last
    return ChatRow(record, messages[: last + 1], tools, leading_dropped=len(leading), trailing_dropped=trailing)


def parse_rows(source: str, records: list[Record], format: str, fields: dict[str, str], skip_invalid: bool,
               assistant_first: str = "drop_turns"):
    """Typed rows plus the invalid ones as (record, reason); raises listing the first few unless skipping."""
    rows, invalid = [], []
    for record in records:
        kind = detect_format(record) if format == "auto" else format
        try:
            if kind in ("sharegpt", "messages"):
                rows.append(to_chat(record, kind, assistant_first))
            else:
                row = to_instruction(record, fields)
                check_text(row.instruction, row.input, row.output)
                rows.append(row)
        except InvalidRow as err:
            invalid.append((record, str(err)))
        except RecursionError:
            invalid.append((record, "the record is nested too deeply"))
    if invalid and not skip_invalid:
        raise invalid_rows_error(source, invalid, len(records))
    return rows, invalid


def check_text(*texts: str) -> None:
    """InvalidRow for text a tokenizer cannot take: JSON's \\ud800-style escapes can decode to lone surrogates."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise InvalidRow(f"the text holds a lone UTF-16 surrogate ({text[err.start]!r}), which is not valid "
                             "Unicode (a truncated emoji escape, most likely)") from None


def invalid_rows_error(source: str, invalid: list[tuple[Record, str]], total: int) -> UserError:
    listed = "\n".join(f"  {r.where}: {reason}" for r, reason in invalid[:MAX_LISTED])
    more = f"\n  ... and {len(invalid) - MAX_LISTED} more" if len(invalid) > MAX_LISTED else ""
    return UserError(
        f"{source}: {len(invalid)} of {total} rows are invalid:\n{listed}{more}\n"
        "fix them, or set data.skip_invalid=true to drop and report them"
    )
