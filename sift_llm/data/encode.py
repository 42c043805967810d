"""Rows to token ids and labels: loss only on what the model should say (response + EOS, assistant turns).

Instruction rows: prompt and response are tokenized separately (batched) and concatenated, so the mask boundary
is exact even where a tokenizer would merge characters across it; the EOS id is appended explicitly, so it stays
in the labels even when the pad token is the EOS token.

Chat rows are rendered by the tokenizer's chat template (with ``tools`` when the row has tools) and tokenized
whole; a token is learned when it starts inside an assistant turn's span, which runs from the end of the
generation prompt to the end of the turn (its end-of-turn token included). Spans come from one render per
conversation: each assistant turn is found as ``generation prompt + content + end of turn`` (both learned once
from a probe conversation), after the turns before it. Where that cannot be verified (a template that rewrites
content, a tool call, a turn-dependent end marker) the spans come from rendering the prefixes before and through
each assistant turn, which is exact for any template that renders a conversation's prefixes as its prefixes.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

from sift_llm.data.readers import ChatRow, InstructionRow, InvalidRow, check_text
from sift_llm.data.templates import TEMPLATES
from sift_llm.errors import UserError

IGNORE_INDEX = -100
_PROBE_USER, _PROBE_ASSISTANT = "sift probe question 7", "sift probe answer 7"
PROBE_TOOLS = [{"type": "function", "function": {
    "name": "sift_probe_lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string", "description": "the word"}},
                   "required": ["word"]}}}]
PROBE_TOOL_CONVERSATION = [
    {"role": "user", "content": _PROBE_USER},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "sift_probe_lookup", "arguments": {"word": "sift_probe_argument"}}}]},
    {"role": "tool", "content": "sift_probe_result"},
    {"role": "assistant", "content": _PROBE_ASSISTANT},
]


class Tokenize:
    """Batched tokenization through the fast tokenizer's backend when it gives the tokenizer's own ids.

    ``tokenizer(texts)`` adds a Python layer around ``tokenizers.Tokenizer.encode_batch`` that costs more than
    the encoding itself; the backend is used only after it reproduced
    the tokenizer's ids and offsets on probe texts, else the tokenizer is called. (A backend with truncation or
    padding configured is copied without them.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation is not None or backend.padding is not None):
            try:  # a copy, so that truncation and padding set in tokenizer.json do not apply
                from tokenizers import Tokenizer

                backend = Tokenizer.from_str(backend.to_str())
                backend.no_truncation()
                backend.no_padding()
            except Exception:  # an exotic backend: the tokenizer's own call is always right
                backend = None
        if backend is not None and self._agrees(backend):
            self.backend = backend

    def _agrees(self, backend) -> bool:
        texts = ["Below is an instruction.\n\n### Response:", " leading space", "tabs\tand\nnewlines\n\n x",
                 "caf\u00e9 \u2028 \u4e2d\u6587 12345 \U0001f600", self.tokenizer.eos_token or "", ""]
        for special in (True, False):
            expected = self.tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)
            got = backend.encode_batch(texts, add_special_tokens=special)
            if [e.ids for e in got] != [list(x) for x in expected["input_ids"]]:
                return False
            if [[tuple(o) for o in e.offsets] for e in got] != [[tuple(o) for o in x] for x in expected["offset_mapping"]]:
                return False
        return True

    def ids(self, texts: list[str], special: bool) -> list[list[int]]:
        if self.backend is not None:
            return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=special)]
        return [list(x) for x in self.tokenizer(texts, add_special_tokens=special)["input_ids"]]

    def ids_and_offsets(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, (start, end) character offsets of each token) per text, no special tokens added."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError("chat records need a fast tokenizer (one with tokenizer.json): the assistant turns are "
                            "found through token offsets, which slow tokenizers do not give")
        if self.backend is not None:
            return [(e.ids, e.offsets) for e in self.backend.encode_batch(texts, add_special_tokens=False)]
        out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), [tuple(o) for o in offsets])
                for ids, offsets in zip(out["input_ids"], out["offset_mapping"])]


def encode_instructions(
    tokenizer, rows: Sequence[InstructionRow], template: str, separator: str, tokenize: Tokenize | None = None
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per row: prompt tokens are masked, the response and one EOS are learned."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token, so instruction rows cannot end their response")
    tokenize = tokenize or Tokenize(tokenizer)
    render = TEMPLATES[template]
    prompt_ids = tokenize.ids([render(row.instruction, row.input) + separator for row in rows], special=True)
    response_ids = tokenize.ids([row.output for row in rows], special=False)
    encoded = []
    for prompt, response in zip(prompt_ids, response_ids):
        response.append(eos)
        encoded.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return encoded


class ChatEncoder:
    """Renders and masks chat rows with one tokenizer (and chat template); see the module docstring."""

    def __init__(self, tokenizer, tokenize: Tokenize | None = None, label: str = "the tokenizer"):
        self.tokenizer = tokenizer
        self.tokenize = tokenize or Tokenize(tokenizer)
        self.label = label
        self._affixes: tuple[str, str] | None | bool = False  # False: not probed yet; None: no fast path
        self._tools_problem: str | None | bool = False
        self.fast_rows = self.prefix_rows = 0

    # -- rendering
    def render(self, messages: list[dict], tools=None, generation: bool = False) -> str:
        if not messages:
            raise InvalidRow("nothing is left of the conversation to render")
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # the template (user-supplied Jinja) may raise anything for a conversation
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InvalidRow(f"the chat template cannot render this conversation ({message})") from None
        if not isinstance(text, str):
            raise InvalidRow(f"the chat template rendered a {type(text).__name__}, not text")
        return text

    def affixes(self) -> tuple[str, str] | None:
        """(generation prompt, end of an assistant turn) learned from a probe conversation, or None."""
        if self._affixes is False:
            self._affixes = None
            try:
                user = [{"role": "user", "content": _PROBE_USER}]
                plain = self.render(user)
                prompted = self.render(user, generation=True)
                both = self.render(user + [{"role": "assistant", "content": _PROBE_ASSISTANT}])
            except InvalidRow:
                return None
            if prompted.startswith(plain) and both.startswith(prompted + _PROBE_ASSISTANT):
                self._affixes = (prompted[len(plain):], both[len(prompted) + len(_PROBE_ASSISTANT):])
        return self._affixes

    def check_tools(self, row: ChatRow, where: str) -> None:
        """A UserError unless the template renders tool definitions, tool calls and tool results."""
        if self._tools_problem is False:
            self._tools_problem = self._probe_tools()
        if self._tools_problem:
            raise UserError(
                f"{where} holds tool definitions or tool calls, but the chat template of {self.label} cannot render "
                f"them ({self._tools_problem}); set data.chat_template to a Jinja file whose template renders "
                "`tools`, assistant `tool_calls` and `tool` messages (as Qwen2.5's or Llama-3.1's do), or drop these rows"
            )

    def _probe_tools(self) -> str | None:
        conversation = PROBE_TOOL_CONVERSATION
        try:
            with_tools = self.render(conversation[:1], tools=PROBE_TOOLS)
            if "sift_probe_lookup" not in with_tools:
                return "the tool definitions passed as `tools` do not appear in the rendered text"
            if "sift_probe_argument" not in self.render(conversation[:2], tools=PROBE_TOOLS):
                return "an assistant turn's `tool_calls` do not appear in the rendered text"
            if "sift_probe_result" not in self.render(conversation, tools=PROBE_TOOLS):
                return "a `tool` message's content does not appear in the rendered text"
        except InvalidRow as err:
            return str(err).replace("this conversation", "a tool-calling conversation")
        return None

    # -- spans
    def spans(self, row: ChatRow) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character spans of its assistant turns."""
        messages, tools = row.messages, row.tools
        full = self.render(messages, tools=tools)
        affixes = None if row.uses_tools else self.affixes()
        if affixes is not None:
            spans = _find_spans(full, messages, *affixes)
            if spans is not None:
                self.fast_rows += 1
                return full, spans
        self.prefix_rows += 1
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:index], tools=tools, generation=True)
            through = self.render(messages[: index + 1], tools=tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise InvalidRow(
                    f"the chat template does not render turn {index + 1} as a prefix of the conversation")
            spans.append((len(before), len(through)))
        return full, spans

    def encode(self, rows: Sequence[ChatRow], where=lambda row: row.record.where) -> list:
        """(input_ids, labels) per row, or the InvalidRow that stands in for a row that cannot be encoded."""
        results: list = [None] * len(rows)
        texts, spans, slots = [], [], []
        for i, row in enumerate(rows):
            if row.uses_tools:
                self.check_tools(row, where(row))
            try:
                text, row_spans = self.spans(row)
                check_text(text)
            except InvalidRow as err:
                results[i] = err
                continue
            texts.append(text)
            spans.append(row_spans)
            slots.append(i)
        for i, row_spans, (ids, offsets) in zip(slots, spans, self.tokenize.ids_and_offsets(texts)):
            results[i] = (ids, _labels(ids, offsets, row_spans))
        return results


def _find_spans(full: str, messages: list[dict], prompt: str, end: str) -> list[tuple[int, int]] | None:
    """Assistant spans located in one render, or None where the rendering does not show them verbatim."""
    spans, cursor = [], 0
    for message in messages:
        content = message["content"]
        if message["role"] == "assistant":
            needle = prompt + content + end
            at = full.find(needle, cursor)
            if at < 0:
                return None
            cursor = at + len(needle)
            spans.append((at + len(prompt), cursor))
        else:
            at = full.find(content, cursor)
            if at >= 0:
                cursor = at + len(content)
    if not full.endswith(prompt + messages[-1]["content"] + end):
        return None  # something (an EOS, say) follows the last turn: the prefix renders place it exactly
    return spans


def _labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels that keep the tokens starting inside a span. Token starts never decrease, so each span's tokens
    are one slice, found by bisection on the (start, end) offsets."""
    labels = [IGNORE_INDEX] * len(ids)
    for lo, hi in spans:
        first, last = bisect.bisect_left(offsets, (lo,)), bisect.bisect_left(offsets, (hi,))
        labels[first:last] = ids[first:last]
    return labels


def encode_chat(tokenizer, row: ChatRow) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one conversation (tests and one-off use; the stage batches with ChatEncoder)."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRow("the tokenizer has no chat template, so chat records cannot be rendered")
    [result] = ChatEncoder(tokenizer).encode([row])
    if isinstance(result, InvalidRow):
        raise result
    return result


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
