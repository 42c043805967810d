"""The data order: one permutation per epoch, shared by every micro-batch of it, identical across ranks."""

import random

from sift_llm.train.batches import BatchPlan


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
