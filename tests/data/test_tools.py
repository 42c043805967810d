"""Tool calls through the chat template's ``tools`` argument: calls learned, results masked, both shapes."""

import json

import pytest

import tiny
from sift_llm.data import DataConfig, load_prepared, prepare
from sift_llm.data.encode import IGNORE_INDEX, ChatEncoder
from sift_llm.data.readers import Record, to_chat
from sift_llm.errors import UserError

# A ChatML template that renders tools (written for this test, in the style of Hermes / Qwen2.5).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for tool in tools %} {{ tool['function']['name'] }}"
    "{{ tool['function']['parameters'] | tojson }}{% endfor %}<|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] is defined %}<|im_start|>assistant\n"
    "{% for call in message['tool_calls'] %}<tool_call>{{ call['function']['name'] }} "
    "{{ call['function']['arguments'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SHAREGPT = {  # LLaMA-Factory's / glaive's layout
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "21 C, sunny"},
        {"from": "gpt", "value": "It is 21 C and sunny."},
    ],
    "tools": json.dumps([WEATHER]),
}
OPENAI = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
        {"role": "assistant", "content": "It is 21 C and sunny."},
    ],
    "tools": [{"type": "function", "function": WEATHER}],
}
RENDERED = (
    '<|im_start|>system\nTools: get_weather{"type": "object", "properties": {"city": {"type": "string"}}, '
    '"required": ["city"]}<|im_end|>\n'
    "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
    '<|im_start|>assistant\n<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>\n'
    "<|im_start|>tool\n21 C, sunny<|im_end|>\n"
    "<|im_start|>assistant\nIt is 21 C and sunny.<|im_end|>\n"
)


def _tool_tokenizer():
    tok = tiny.build_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def _runs(tok, ids, labels, learned=True):
    """The decoded runs of consecutive learned (or masked) tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if (label != IGNORE_INDEX) == learned:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


@pytest.mark.parametrize("record,format", [(SHAREGPT, "sharegpt"), (OPENAI, "messages")], ids=["sharegpt", "openai"])
def test_a_tool_conversation_renders_with_tools_and_learns_the_calls_not_the_results(record, format):
    tok = _tool_tokenizer()
    row = to_chat(Record(1, 1, record), format)
    [(ids, labels)] = ChatEncoder(tok).encode([row])
    assert tok.decode(ids) == RENDERED
    # learned: the call turn and the answer turn, each through its end-of-turn token; nothing else
    assert _runs(tok, ids, labels) == [
        '<tool_call>get_weather {"city": "Paris"}</tool_call><|im_end|>\n',
        "It is 21 C and sunny.<|im_end|>\n",
    ]
    masked = _runs(tok, ids, labels, learned=False)
    assert masked[0].startswith("<|im_start|>system\nTools: get_weather") and masked[0].endswith("<|im_start|>assistant\n")
    assert masked[1] == "<|im_start|>tool\n21 C, sunny<|im_end|>\n<|im_start|>assistant\n"  # the tool result is masked
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))


def test_a_template_that_ignores_tools_is_a_clear_error(tmp_path, tiny_model_dir):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps(OPENAI) + "\n")
    with pytest.raises(UserError, match=r"tools.jsonl: row 2 \(line 2\) holds tool definitions or tool calls, but "
                                        r"the chat template of .* cannot render them \(the tool definitions passed "
                                        r"as `tools` do not appear in the rendered text\); set data.chat_template"):
        prepare(DataConfig(path=str(path), validation_size=0, output_dir=str(tmp_path / "out")), tiny_model_dir)
    assert not (tmp_path / "out").exists()


def test_data_chat_template_supplies_a_template_that_renders_tools(tmp_path, tiny_model_dir):
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(SHAREGPT) + "\n" + json.dumps(OPENAI) + "\n")
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    cfg = DataConfig(path=str(path), validation_size=0, chat_template=str(template), output_dir=str(tmp_path / "out"))
    prepared = prepare(cfg, tiny_model_dir)
    rows = list(load_prepared(prepared.path)["train"])
    assert len(rows) == 2 and rows[0] == rows[1]  # both shapes give the same example
    assert prepared.stats["encode"]["chat_prefix_render_rows"] == 2
    # the template's text is part of the fingerprint, its path is not
    moved = tmp_path / "elsewhere.jinja"
    moved.write_text(TOOL_TEMPLATE)
    cfg.chat_template = str(moved)
    assert prepare(cfg, tiny_model_dir).cached
    moved.write_text(TOOL_TEMPLATE.replace("Tools:", "Functions:"))
    assert not prepare(cfg, tiny_model_dir).cached
