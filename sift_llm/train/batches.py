"""Deterministic, resumable data order: every rank knows which micro-batch comes next from (epoch, index)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from sift_llm.data.encode import IGNORE_INDEX


@dataclass
class DataPosition:
    """Where the loop is in the data: how many micro-batches this rank has consumed, over all epochs."""

    micro_batches_done: int = 0


class BatchPlan:
    """Shuffled-per-epoch, rank-sharded micro-batches of a tokenized split.

    Each epoch's order is a seeded permutation shared by all ranks; rank r takes every world-th example
    of it, truncated so all ranks have the same number of micro-batches (collectives stay in step).
    """

    def __init__(self, dataset, micro_batch_size: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.rank, self.world, self.seed, self.shuffle = rank, world, seed, shuffle
        per_rank = len(dataset) // world
        if per_rank == 0:
            raise ValueError(f"{len(dataset)} examples cannot be split over {world} ranks")
        self.examples_per_rank = per_rank
        self.micro_batches_per_epoch = math.ceil(per_rank / micro_batch_size)
        self._epoch: int | None = None  # the epoch whose shard is cached in _mine
        self._mine: list[int] = []

    def epoch_order(self, epoch: int) -> list[int]:
        """This rank's example indices for ``epoch``, in order; computed once per epoch, not per micro-batch
        (shuffling a 50k-row permutation for every micro-batch costs milliseconds each step)."""
        if epoch != self._epoch:
            order = list(range(len(self.dataset)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._mine = order[self.rank :: self.world][: self.examples_per_rank]
            self._epoch = epoch
        return self._mine

    def indices(self, epoch: int, micro_batch: int) -> list[int]:
        start = micro_batch * self.micro_batch_size
        return self.epoch_order(epoch)[start : start + self.micro_batch_size]

    def batch(self, position: int, pad_id: int) -> dict[str, torch.Tensor]:
        """The ``position``-th micro-batch of this rank's endless stream of epochs."""
        epoch, micro_batch = divmod(position, self.micro_batches_per_epoch)
        return collate([self.dataset[i] for i in self.indices(epoch, micro_batch)], pad_id)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked out of attention and of the loss by position.

    Labels are padded with IGNORE_INDEX by length, never by comparing ids with the pad id, so an EOS
    that equals the pad token keeps its label.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
