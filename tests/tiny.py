"""A tiny LLaMA and tokenizer built locally, so tests never touch a hub or the real assets."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The quick brown fox jumps over the lazy dog. Answer: A B C D",
    "Give three tips for staying healthy. Eat well, sleep, and exercise.",
    "What is the capital of France? Paris is the capital of France.",
    "user assistant system hello world translate summarize explain the answer is",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) , . ! ? : ; ' \"",
]


def build_tokenizer(pad_is_eos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocab < 512) with LLaMA-like special tokens and a ChatML template."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>" if pad_is_eos else "<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_model(vocab_size: int, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised LLaMA small enough to train in a test, with room for lm-eval prompts."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def save_tiny_model_dir(path: Path, *, pad_is_eos: bool = False, seed: int = 0) -> Path:
    """Write an HF model directory (safetensors + tokenizer) that from_pretrained loads."""
    tokenizer = build_tokenizer(pad_is_eos=pad_is_eos)
    model = build_model(len(tokenizer), seed=seed)
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
