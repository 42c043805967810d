from pathlib import Path

import pytest

import tiny
from sift_llm.data.encode import IGNORE_INDEX, encode_chat, encode_instructions, fit_length
from sift_llm.data.readers import ChatRow, InstructionRow, InvalidRow, Record
from sift_llm.data.templates import alpaca_prompt

EXAMPLES = Path(__file__).parents[2] / "data" / "examples"


def test_alpaca_prompt_with_input_is_stanford_alpaca_verbatim():
    assert alpaca_prompt("Add.", "2 and 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:"
    )


def test_alpaca_prompt_without_input_is_stanford_alpaca_verbatim():
    assert alpaca_prompt("Name a color.") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nName a color.\n\n### Response:"
    )
    assert alpaca_prompt("Name a color.", "") == alpaca_prompt("Name a color.")


def _row(instruction, input, output):
    return InstructionRow(Record(1, 1, {}), instruction, input, output)


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_labels_mask_exactly_the_prompt_and_keep_eos(pad_is_eos):
    tok = tiny.build_tokenizer(pad_is_eos=pad_is_eos)
    row = _row("What is the capital of France?", "", "Paris is the capital of France.")
    [(ids, labels)] = encode_instructions(tok, [row], "alpaca", separator="")
    prompt_ids = tok(alpaca_prompt(row.instruction), add_special_tokens=True)["input_ids"]
    response_ids = tok(row.output, add_special_tokens=False)["input_ids"]
    assert ids == prompt_ids + response_ids + [tok.eos_token_id]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids) :] == response_ids + [tok.eos_token_id]
    assert labels[-1] == tok.eos_token_id == ids[-1]
    if pad_is_eos:
        assert tok.pad_token_id == tok.eos_token_id


def test_response_separator_goes_into_the_masked_prompt():
    tok = tiny.build_tokenizer()
    row = _row("Name a color.", "", "Blue.")
    [(ids, labels)] = encode_instructions(tok, [row], "alpaca", separator="\n")
    prompt_ids = tok(alpaca_prompt(row.instruction) + "\n", add_special_tokens=True)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels.count(IGNORE_INDEX) == len(prompt_ids)


def _learned_text(tok, ids, labels):
    return tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])


def test_chat_learns_only_assistant_turns_with_their_end_token():
    tok = tiny.build_tokenizer()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And 2 + 3?"},
        {"role": "assistant", "content": "5."},
    ]
    ids, labels = encode_chat(tok, ChatRow(Record(1, 1, {}), messages))
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)
    assert _learned_text(tok, ids, labels) == "Paris.<|im_end|>\n5.<|im_end|>\n"
    # Every masked token belongs to system/user turns or to the role headers.
    masked = tok.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "What is the capital" in masked and "Answer briefly." in masked and "Paris" not in masked


def test_truncation_cuts_the_response_tail_and_drops_rows_without_room():
    ids, labels = list(range(10)), [IGNORE_INDEX] * 6 + [6, 7, 8, 9]
    cut_ids, cut_labels, truncated = fit_length(ids, labels, 8, "truncate_response", 1)
    assert truncated and cut_ids == list(range(8)) and cut_labels == [IGNORE_INDEX] * 6 + [6, 7]
    with pytest.raises(InvalidRow, match="leaves 2 response tokens"):
        fit_length(ids, labels, 8, "truncate_response", 3)
    with pytest.raises(InvalidRow, match="over max_length 8"):
        fit_length(ids, labels, 8, "drop", 1)
    assert fit_length(ids, labels, 10, "drop", 1) == (ids, labels, False)
