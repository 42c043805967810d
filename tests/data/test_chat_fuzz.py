"""Fuzz the chat reader and encoder: whatever a record holds, it becomes an example or a reported invalid row."""

import json
import random

import pytest

import tiny
from sift_llm.data import DataConfig, prepare
from sift_llm.data.encode import IGNORE_INDEX, ChatEncoder, fit_length
from sift_llm.data.readers import ChatRow, InvalidRow, Record, to_chat
from sift_llm.errors import UserError
from test_tools import TOOL_TEMPLATE

# Templates written for these tests, each with a behaviour real ones have.
DEFAULT_SYSTEM = (  # SmolLM2-style: a default system prompt when the conversation has none
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
STRICT = (  # Llama-2 / Mistral-style: roles must alternate, else the template raises
    "{% for message in messages %}{% if message['role'] != 'system' and (message['role'] == 'user') != "
    "(loop.index0 % 2 == (1 if messages[0]['role'] == 'system' else 0)) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRIM = (  # Llama-3-style: contents are trimmed, so a turn's text is not always rendered verbatim
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEMPLATES = {"chatml": tiny.CHAT_TEMPLATE, "default_system": DEFAULT_SYSTEM, "strict": STRICT, "trim": TRIM,
             "tools": TOOL_TEMPLATE}
ROLES_SHAREGPT = ["human", "gpt", "system", "bing", "robot", "function_call", "observation", "", None, 7]
ROLES_OPENAI = ["user", "assistant", "system", "tool", "developer", "function", "narrator", None]


def _content(rng, clean):
    choice = rng.random() * (0.75 if clean else 1.0)
    if choice < 0.75:
        return " ".join(rng.choice("the quick brown fox answer is 42 ? ! \u2028 caf\u00e9".split())
                        for _ in range(rng.randrange(1, 12)))
    if choice < 0.8:
        return rng.choice(["", "   ", "\n\t", " padded both "])
    if choice < 0.83:
        return "huge " * rng.randrange(2000, 6000)
    if choice < 0.88:
        return rng.choice([None, 42, 3.5, True, {"text": "x"}, ["a", "b"]])
    if choice < 0.96:
        return [{"type": "text", "text": "part one"}, {"type": rng.choice(["text", "image_url"]), "text": "two"}]
    return json.dumps({"name": rng.choice(["get_weather", ""]), "arguments": rng.choice([{"city": "Paris"}, "{bad"])})


def _record(rng):
    sharegpt = rng.random() < 0.5
    clean = rng.random() < 0.5  # random roles and order, but well-formed turns
    key, role_key, content_key, roles = (("conversations", "from", "value", ROLES_SHAREGPT) if sharegpt
                                          else ("messages", "role", "content", ROLES_OPENAI))
    turns = []
    for _ in range(rng.randrange(0, 7)):
        if not clean and rng.random() < 0.03:
            turns.append(rng.choice(["not a turn", 5, None]))
            continue
        turn = {role_key: rng.choice(roles[:3]) if clean or rng.random() < 0.9 else rng.choice(roles)}
        if clean or rng.random() < 0.95:
            turn[content_key] = _content(rng, clean)
        if not sharegpt and turn[role_key] == "assistant" and rng.random() < 0.2:
            turn["tool_calls"] = [{"id": "c1", "type": "function",
                                   "function": {"name": "get_weather", "arguments": rng.choice(['{"city": "X"}', "{"])}}]
        turns.append(turn)
    record = {key: turns if clean or rng.random() < 0.97 else rng.choice(["text", None, {}])}
    if not clean and rng.random() < 0.15:
        record["tools"] = rng.choice([[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
                                      "[{", json.dumps([{"name": "get_weather"}]), 5])
    if not clean and rng.random() < 0.1:
        record["system"] = rng.choice(["Be brief.", "", 3])
    return record, ("sharegpt" if sharegpt else "messages")


def _fresh_encoder(template, single_render=True):
    tok = tiny.build_tokenizer()
    tok.chat_template = template
    encoder = ChatEncoder(tok)
    if not single_render:
        encoder._affixes = None  # only the prefix renders
    return tok, encoder


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_every_random_record_is_an_example_or_a_reported_invalid_row(name):
    tok, encoder = _fresh_encoder(TEMPLATES[name])
    _, reference = _fresh_encoder(TEMPLATES[name], single_render=False)
    rng = random.Random(sorted(TEMPLATES).index(name))
    outcomes = {"example": 0, "invalid": 0, "tools unsupported": 0}
    for number in range(400):
        data, format = _record(rng)
        try:
            row = to_chat(Record(number + 1, number + 1, data), format)
        except InvalidRow:
            outcomes["invalid"] += 1
            continue
        assert isinstance(row, ChatRow) and row.messages[-1]["role"] == "assistant"
        try:
            [result] = encoder.encode([row])
        except UserError as err:  # a file-level error, and only this one: the template cannot render tools
            assert row.uses_tools and "cannot render them" in str(err) and name != "tools"
            outcomes["tools unsupported"] += 1
            continue
        if isinstance(result, InvalidRow):
            assert "chat template" in str(result)
            outcomes["invalid"] += 1
            continue
        ids, labels = result
        assert len(ids) == len(labels) > 0 and all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
        assert any(label != IGNORE_INDEX for label in labels)
        assert tok.decode(ids) == encoder.render(row.messages, tools=row.tools)
        # one render per conversation gives exactly the masks the prefix renders give
        [expected] = reference.encode([row])
        assert result == expected
        try:
            fit_length(ids, labels, 256, "truncate_response", 1)
        except InvalidRow:
            outcomes["invalid"] += 1
            continue
        outcomes["example"] += 1
    assert outcomes["example"] >= 20 and outcomes["invalid"] >= 100, outcomes
    if name in ("chatml", "default_system"):
        assert encoder.prefix_rows <= encoder.fast_rows // 5  # tool rows only: the rest render once


def test_the_stage_never_ends_in_a_traceback_on_random_records(tmp_path, tiny_model_dir):
    rng = random.Random(11)
    records = [_record(rng)[0] for _ in range(300)]
    path = tmp_path / "fuzz.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    template = tmp_path / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    cfg = DataConfig(path=str(path), validation_size=0, max_length=256, chat_template=str(template),
                     output_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match=r"rows are invalid"):
        prepare(cfg, tiny_model_dir)
    cfg.skip_invalid = True
    prepared = prepare(cfg, tiny_model_dir)
    assert prepared.stats["examples"] + prepared.stats["dropped"] == len(records)
    assert prepared.stats["examples"] > 20 and prepared.stats["encode"]["chat_prefix_render_rows"] > 0


def test_rendering_is_one_template_call_per_conversation_however_many_turns(monkeypatch):
    tok, encoder = _fresh_encoder(DEFAULT_SYSTEM)
    encoder.affixes()  # the probe renders once per tokenizer
    calls = []
    original = tok.apply_chat_template
    monkeypatch.setattr(tok, "apply_chat_template", lambda *a, **k: calls.append(1) or original(*a, **k))
    for turns in (2, 20, 80):
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(turns)]
        calls.clear()
        [(ids, labels)] = encoder.encode([ChatRow(Record(1, None, {}), messages)])
        assert len(calls) == 1, turns  # the prefix renders needed 1 + 2 per assistant turn: quadratic text
        assert tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX]) == "".join(
            f"turn {i}<|im_end|>\n" for i in range(1, turns, 2))
