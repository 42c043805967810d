"""Packing: whole examples per max_length sequence, kept apart by restarting position ids, exact losses."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers import masking_utils

from sift_llm.data import DataConfig, load_prepared, prepare
from sift_llm.data.encode import IGNORE_INDEX
from sift_llm.data.packing import pack, pack_order
from sift_llm.train.batches import BatchPlan, collate, real_tokens


def _examples(lengths, seed=0, vocab=300):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(5, vocab) for _ in range(n)]
        prompt = rng.randrange(1, n)
        out.append((ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return out


def test_bins_hold_whole_examples_within_max_length_and_are_deterministic():
    lengths = [random.Random(1).randrange(2, 60) for _ in range(300)]
    bins = pack_order(lengths, 64, seed=3)
    assert sorted(i for b in bins for i in b) == list(range(300))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert pack_order(lengths, 64, seed=3) == bins
    assert pack_order(lengths, 64, seed=4) != bins
    # best-fit decreasing leaves little room: fewer than 10% more sequences than the token bound
    assert len(bins) <= 1.1 * sum(lengths) / 64 + 1


def test_packed_rows_restart_positions_and_mask_each_examples_first_label():
    examples = _examples([5, 3, 4])
    [row] = pack(examples, 16, seed=0)
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) == 3 and len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == 12
    by_first_id = {ids[0]: (ids, labels) for ids, labels in examples}
    for a, b in zip(starts, starts[1:] + [12]):
        ids, labels = by_first_id[row["input_ids"][a]]
        assert row["input_ids"][a:b] == ids and row["position_ids"][a:b] == list(range(len(ids)))
        # the first label is -100 so no example predicts across the boundary; the rest are the example's own
        assert row["labels"][a] == IGNORE_INDEX and row["labels"][a + 1 : b] == labels[1:]


def _model(attn: str):
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _per_token_losses(logits, labels):
    return F.cross_entropy(logits[:-1].float(), labels[1:], reduction="none", ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_gives_every_example_its_unpacked_per_token_losses(attn, monkeypatch):
    model = _model(attn)
    assert model.config._attn_implementation == attn
    detected = []
    original = masking_utils.find_packed_sequence_indices
    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                        lambda p: detected.append(original(p)) or detected[-1])
    examples = _examples([7, 12, 3, 9, 15, 4, 6, 11, 5, 8], seed=2)
    packed = pack(examples, 32, seed=0)
    batch = collate(packed, pad_id=0)  # rows of different lengths: the shorter rows get a padding tail
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == len(packed) > 1
    assert min(len(p["input_ids"]) for p in packed) < batch["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        worst = 0.0
        for row, p in enumerate(packed):
            starts = [i for i, x in enumerate(p["position_ids"]) if x == 0] + [len(p["position_ids"])]
            for a, b in zip(starts, starts[1:]):
                ids = torch.tensor([p["input_ids"][a:b]])
                labels = torch.tensor([p["labels"][a:b]])
                alone = model(input_ids=ids, use_cache=False).logits[0]
                packed_losses = _per_token_losses(out.logits[row, a:b], labels[0])
                alone_losses = _per_token_losses(alone, labels[0])
                worst = max(worst, (packed_losses - alone_losses).abs().max().item())
    assert worst < 1e-5, worst
    # transformers took its packed-sequence path (position ids, no attention mask) for the batch
    assert detected and detected[0] is not None
    # and the batch's token-weighted loss is that of the examples unpacked
    learned = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for _, labels in examples)
    assert int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) == learned
    unpacked_sum = 0.0
    with torch.no_grad():
        for ids, labels in examples:
            unpacked_sum += float(model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]),
                                        use_cache=False).loss) * sum(label != IGNORE_INDEX for label in labels[1:])
    assert abs(float(out.loss) - unpacked_sum / learned) < 1e-5
    assert int(real_tokens(batch)) == sum(len(ids) for ids, _ in examples)


def test_without_position_ids_the_examples_would_see_each_other():
    """The control: the same rows as one sequence each change the losses, so the equality above is not vacuous."""
    model = _model("sdpa")
    packed = pack(_examples([7, 12, 3, 9], seed=2), 32, seed=0)
    batch = collate(packed, pad_id=0)
    with torch.no_grad():
        with_positions = model(**batch, use_cache=False).logits
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert (with_positions - plain).abs().max() > 1e-3


def _corpus(tmp_path, rows=40):
    rng = random.Random(0)
    words = "the quick brown fox jumps over the lazy dog answer is".split()
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({
        "instruction": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 12))),
        "output": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 20))),
    }) + "\n" for _ in range(rows)))
    return path


def test_the_stage_packs_train_only_and_keeps_validation_identical(tmp_path, tiny_model_dir):
    path = _corpus(tmp_path)
    base = dict(path=str(path), validation_size=6, max_length=128)
    plain = prepare(DataConfig(**base, output_dir=str(tmp_path / "plain")), tiny_model_dir)
    packed = prepare(DataConfig(**base, packing=True, output_dir=str(tmp_path / "packed")), tiny_model_dir)
    assert packed.stats["fingerprint"] != plain.stats["fingerprint"]
    a, b = load_prepared(plain.path), load_prepared(packed.path)
    # the held-out split is the same examples in the same order: the held-out loss is the same quantity
    assert list(a["validation"]) == list(b["validation"]) and "position_ids" not in b["validation"].column_names
    assert set(b["train"].column_names) == {"input_ids", "labels", "position_ids"}
    assert len(b["train"]) < len(a["train"]) == packed.stats["train_examples"]
    assert packed.stats["packing"]["sequences"] == len(b["train"])
    assert packed.stats["packing"]["examples"] == len(a["train"])
    assert all(len(row["input_ids"]) <= 128 for row in b["train"])
    # the same tokens and the same learned tokens (beyond each example's first) end up in the train split
    assert sum(len(r["input_ids"]) for r in a["train"]) == sum(len(r["input_ids"]) for r in b["train"])
    learned = lambda rows: sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)  # noqa: E731
    first_learned = sum(r["labels"][0] != IGNORE_INDEX for r in a["train"])
    assert first_learned == 0 and learned(a["train"]) == learned(b["train"])
    again = prepare(DataConfig(**base, packing=True, output_dir=str(tmp_path / "again")), tiny_model_dir)
    assert list(load_prepared(again.path)["train"]) == list(b["train"])  # deterministic


def test_packed_batches_resume_at_the_same_micro_batch(tmp_path, tiny_model_dir):
    path = _corpus(tmp_path, rows=60)
    prepared = prepare(DataConfig(path=str(path), validation_size=0, max_length=64, packing=True,
                                  output_dir=str(tmp_path / "out")), tiny_model_dir)
    train = load_prepared(prepared.path)["train"]
    plan = BatchPlan(train, micro_batch_size=2, rank=0, world=1, seed=5)
    stream = [plan.batch(p, pad_id=0) for p in range(2 * plan.micro_batches_per_epoch + 1)]
    resumed = BatchPlan(train, micro_batch_size=2, rank=0, world=1, seed=5)  # a fresh process after a restart
    for position in (3, plan.micro_batches_per_epoch, len(stream) - 1):
        batch = resumed.batch(position, pad_id=0)
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert all(torch.equal(batch[k], stream[position][k]) for k in batch)
