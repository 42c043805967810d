"""The data order: one permutation per epoch, shared by every micro-batch of it, identical across ranks."""

import random

import torch

from sift_llm.data.encode import IGNORE_INDEX
from sift_llm.train.batches import BatchPlan, collate, real_tokens


class _Rows(list):
    def __getitem__(self, index):
        return {"input_ids": [index + 1], "labels": [index + 1]}


def test_the_permutation_is_built_once_per_epoch_not_per_micro_batch(monkeypatch):
    shuffles = []
    original = random.Random.shuffle
    monkeypatch.setattr(random.Random, "shuffle", lambda self, x: (shuffles.append(len(x)), original(self, x))[1])
    plan = BatchPlan(_Rows(range(1000)), micro_batch_size=4, rank=0, world=2, seed=3)
    for position in range(3 * plan.micro_batches_per_epoch):  # three epochs
        plan.batch(position, pad_id=0)
    assert shuffles == [1000, 1000, 1000]


def test_ranks_cover_each_epoch_disjointly_and_the_cache_keeps_the_order():
    plans = [BatchPlan(_Rows(range(50)), micro_batch_size=3, rank=r, world=2, seed=1) for r in range(2)]
    for epoch in range(2):
        seen = [i for plan in plans for m in range(plan.micro_batches_per_epoch) for i in plan.indices(epoch, m)]
        assert sorted(seen) == list(range(50))
    fresh = BatchPlan(_Rows(range(50)), micro_batch_size=3, rank=1, world=2, seed=1)
    assert [fresh.indices(0, m) for m in range(3)] == [plans[1].indices(0, m) for m in range(3)]
    assert plans[0].indices(0, 0) != plans[0].indices(1, 0)


def test_padded_rows_carry_an_attention_mask_and_labels_padded_by_length():
    batch = collate([{"input_ids": [5, 6, 2], "labels": [-100, 6, 2]}, {"input_ids": [7], "labels": [7]}], pad_id=2)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 2], [7, -100, -100]]  # the EOS equal to the pad id keeps its label
    assert int(real_tokens(batch)) == 4


def test_packed_rows_carry_position_ids_and_no_attention_mask():
    """transformers detects packed sequences from position ids only when no attention mask is passed."""
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE_INDEX, 6, IGNORE_INDEX, 8, 9], "position_ids": [0, 1, 0, 1, 2]},
            {"input_ids": [3, 4], "labels": [IGNORE_INDEX, 4], "position_ids": [0, 1]}]
    batch = collate(rows, pad_id=0)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2], [0, 1, 0, 1, 2]]  # the padding tail restarts too
    assert batch["input_ids"][1].tolist() == [3, 4, 0, 0, 0]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 4, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert int(real_tokens(batch)) == 7
    full = collate(rows[:1], pad_id=0)
    assert int(real_tokens(full)) == 5 and full["position_ids"].dtype == torch.long
