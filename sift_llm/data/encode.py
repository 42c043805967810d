"""Rows to token ids and labels: loss only on what the model should say (response + EOS, assistant turns)."""

from __future__ import annotations

from collections.abc import Sequence

from sift_llm.data.readers import ChatRow, InstructionRow, InvalidRow
from sift_llm.data.templates import TEMPLATES

IGNORE_INDEX = -100


def encode_instructions(
    tokenizer, rows: Sequence[InstructionRow], template: str, separator: str
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: prompt tokens are masked, the response and one EOS are learned.

    Prompt and response are tokenized separately and concatenated, so the mask boundary is exact even
    where a tokenizer would merge characters across it; the EOS id is appended explicitly, so it stays in
    the labels even when the pad token is the EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise InvalidRow("the tokenizer has no EOS token")
    render = TEMPLATES[template]
    prompts = [render(row.instruction, row.input) + separator for row in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer([row.output for row in rows], add_special_tokens=False)["input_ids"]
    encoded = []
    for prompt, response in zip(prompt_ids, response_ids):
        target = list(response) + [tokenizer.eos_token_id]
        encoded.append((list(prompt) + target, [IGNORE_INDEX] * len(prompt) + target))
    return encoded


def encode_chat(tokenizer, row: ChatRow) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a conversation rendered by the tokenizer's chat template.

    Each assistant turn's character span is found by rendering the conversation up to that turn (with
    the generation prompt) and up to its end; tokens starting inside a span are learned, all others masked.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRow("the tokenizer has no chat template, so chat records cannot be rendered")
    messages = row.messages
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise InvalidRow(f"the chat template does not render turn {index + 1} as a prefix of the conversation")
        spans.append((len(before), len(through)))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [
        token if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
        for token, (start, _end) in zip(ids, encoding["offset_mapping"])
    ]
    return ids, labels


def fit_length(
    ids: list[int], labels: list[int], max_length: int, policy: str, min_response_tokens: int
) -> tuple[list[int], list[int], bool]:
    """Apply the truncation policy: returns (ids, labels, truncated) or raises InvalidRow to drop the row."""
    if len(ids) <= max_length:
        return ids, labels, False
    if policy == "drop":
        raise InvalidRow(f"{len(ids)} tokens, over max_length {max_length}")
    total = len(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    kept = sum(label != IGNORE_INDEX for label in labels)
    if kept < min_response_tokens:
        raise InvalidRow(
            f"{total} tokens: truncation to max_length {max_length} leaves {kept} response tokens"
            f" (at least {min_response_tokens} required)"
        )
    return ids, labels, True
