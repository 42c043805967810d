"""Readers on the text real corpora carry: line separators inside JSON strings, content parts, tool calls."""

import json

import pytest

from sift_llm.data import DataConfig, load_prepared, prepare
from sift_llm.data.readers import InvalidRow, Record, read_records, to_chat
from sift_llm.errors import UserError

# Characters str.splitlines() breaks lines at, though JSONL records end at "\n" only.
LINE_BREAKERS = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]


def test_jsonl_records_end_at_newline_only(tmp_path):
    rows = [{"instruction": f"say {i}{ch}twice", "output": f"ok{ch}ok"} for i, ch in enumerate(LINE_BREAKERS)]
    path = tmp_path / "web.jsonl"
    # ensure_ascii=False writes the characters raw, as real web exports do
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    records = read_records(path)
    assert [r.data for r in records] == rows
    assert [r.line for r in records] == list(range(1, len(rows) + 1))


def test_crlf_and_blank_lines_keep_line_numbers(tmp_path):
    path = tmp_path / "dos.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\r\n{"a": 2}\r\n')
    assert [(r.row, r.line, r.data) for r in read_records(path)] == [(1, 1, {"a": 1}), (2, 3, {"a": 2})]


def test_a_broken_line_after_a_separator_character_is_named_by_its_real_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": "x\u2028y"}\n{"a": \n', encoding="utf-8")
    with pytest.raises(UserError, match=r"bad.jsonl:2: invalid JSON line"):
        read_records(path)


def test_json_array_records_know_their_lines(tmp_path):
    path = tmp_path / "array.json"
    path.write_text('[\n  {"a": "x\u2028y"},\n\n  {"a": 2}\n]\n', encoding="utf-8")
    assert [(r.row, r.line) for r in read_records(path)] == [(1, 2), (2, 4)]


def _chat(data, format="messages", **kwargs):
    return to_chat(Record(1, 1, data), format, **kwargs)


def test_openai_text_parts_are_joined_and_other_parts_are_invalid():
    row = _chat({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "text", "text": "what is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
    ]})
    assert [m["content"] for m in row.messages] == ["Look:\nwhat is it?", "A cat."]
    with pytest.raises(InvalidRow, match=r"messages\[1\].content\[2\] is a 'image_url' part; only text parts"):
        _chat({"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]},
            {"role": "assistant", "content": "A cat."},
        ]})


def test_sharegpt_function_call_and_observation_turns_become_tool_messages():
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    row = _chat({
        "conversations": [
            {"from": "human", "value": "Weather in Paris?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
            {"from": "observation", "value": json.dumps({"temperature": 21})},
            {"from": "gpt", "value": "It is 21 degrees."},
        ],
        "system": "Be brief.",
        "tools": json.dumps(tools),  # LLaMA-Factory and glaive store the tools as a JSON string
    }, format="sharegpt")
    assert row.tools == [{"type": "function", "function": tools[0]}]
    assert row.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]


def test_openai_tool_calls_parse_their_json_arguments():
    row = _chat({
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "21"},
            {"role": "assistant", "content": "21 degrees."},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}],
    })
    assert row.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call_1"}]}
    assert row.messages[2] == {"role": "tool", "content": "21", "tool_call_id": "call_1"}
    assert row.uses_tools


BAD_CHATS = [
    ({"messages": []}, r"'messages' is an empty list"),
    ({"messages": "hi"}, r"'messages' is a str, not a list"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}]},
     r"messages\[2\].role is 'robot', expected one of"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  \n"}]},
     r"messages\[2\].content is empty"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}]},
     r"messages\[2\].content must be a string or a list of content parts, got int"),
    ({"messages": [{"role": "system", "content": "You are terse."}]},
     r"no assistant turn to learn from \(it holds only system turns\)"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     r"messages\[2\].tool_calls\[1\]: the arguments of 'f' are not JSON"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}], "tools": "[{"},
     r"field 'tools' is not JSON"),
    ({"messages": [{"role": "assistant", "content": "Hello!"}]},
     r"messages\[1\] \(assistant\) comes before any user turn and no user turn follows"),
]


@pytest.mark.parametrize("data,message", BAD_CHATS, ids=[m[:30] for _, m in BAD_CHATS])
def test_record_level_problems_are_invalid_rows_with_the_place_named(data, message):
    with pytest.raises(InvalidRow, match=message):
        _chat(data)


def test_assistant_first_turns_are_dropped_or_reported_as_configured():
    data = {"conversations": [{"from": "gpt", "value": "...and that is the rest of it."},
                              {"from": "human", "value": "Thanks! And 2 + 3?"}, {"from": "gpt", "value": "5."},
                              {"from": "human", "value": "Bye."}]}
    row = _chat(data, format="sharegpt")
    assert [m["role"] for m in row.messages] == ["user", "assistant"]
    assert (row.leading_dropped, row.trailing_dropped) == (1, 1)
    with pytest.raises(InvalidRow, match=r"conversations\[1\] \(assistant\) comes before any user turn"):
        _chat(data, format="sharegpt", assistant_first="invalid")


def test_sharegpt_assistant_aliases_are_assistant_turns():
    row = _chat({"conversations": [{"from": "human", "value": "hi"}, {"from": "bing", "value": "Hello."}]},
                format="sharegpt")
    assert row.messages[1] == {"role": "assistant", "content": "Hello."}


def test_real_corpus_cases_end_to_end(tmp_path, tiny_model_dir):
    """One file with the cases real ShareGPT / OpenAI exports hold: each becomes an example or a reported row."""
    records = [
        {"conversations": [{"from": "human", "value": "Line\u2028separated?"}, {"from": "gpt", "value": "Yes\u2029."}]},
        {"conversations": [{"from": "gpt", "value": "(continued) ...done."}, {"from": "human", "value": "Thanks"},
                           {"from": "gpt", "value": "You are welcome."}]},
        {"conversations": [{"from": "system", "value": "Only a system prompt."}]},
        {"conversations": []},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "world"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
                      {"role": "assistant", "content": "heard"}]},
    ]
    path = tmp_path / "real.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    cfg = DataConfig(path=str(path), validation_size=0, output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"3 of 6 rows are invalid:\n  row 3 \(line 3\): the conversation has no "
                                        r"assistant turn"):
        prepare(cfg, tiny_model_dir)
    cfg.skip_invalid = True
    prepared = prepare(cfg, tiny_model_dir)
    assert prepared.stats["examples"] == 3 and prepared.stats["dropped"] == 3
    assert [d["row"] for d in prepared.stats["dropped_rows"]] == [3, 4, 6]
    assert prepared.stats["sources"][0]["leading_turns_dropped"] == 1
    assert len(load_prepared(prepared.path)["train"]) == 3


def test_lone_surrogates_and_deep_nesting_are_reported_not_raised(tmp_path, tiny_model_dir):
    path = tmp_path / "odd.jsonl"
    lines = ['{"instruction": "truncated emoji \\ud83d", "output": "ok"}',
             '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "bad \\udc00"}]}',
             '{"instruction": "fine", "output": "ok"}']
    path.write_text("\n".join(lines) + "\n")
    prepared = prepare(DataConfig(path=str(path), validation_size=0, skip_invalid=True,
                                  output_dir=str(tmp_path / "out")), tiny_model_dir)
    assert prepared.stats["examples"] == 1
    assert [d["row"] for d in prepared.stats["dropped_rows"]] == [1, 2]
    assert all("lone UTF-16 surrogate" in d["reason"] for d in prepared.stats["dropped_rows"])
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"instruction": "a", "output": "b"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match=r"deep.jsonl:2: the JSON is nested too deeply"):
        read_records(deep)
