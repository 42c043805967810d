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

    Packed rows (examples with ``position_ids``, from ``data.packing``) get no ``attention_mask``: transformers
    then reads the restarting position ids as packed sequences and keeps attention inside each example
    (``masking_utils.find_packed_sequence_indices``; sdpa and eager, and flash-attention for one row per
    micro-batch). Their padding tail gets position ids 0, 1, ... of its own, so it is one more sequence that no
    real token attends to. This needs ``use_cache=False`` in the forward (the trainer sets it), since a cache
    turns the packed-sequence detection off.
    """
    longest = max(len(e["input_ids"]) for e in examples)
    packed = "position_ids" in examples[0]
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    if packed:
        positions = torch.arange(longest, dtype=torch.long).repeat(len(examples), 1)
    else:
        mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.as_tensor(example["input_ids"])
        labels[row, :n] = torch.as_tensor(example["labels"])
        if packed:
            positions[row, :n] = torch.as_tensor(example["position_ids"])
            positions[row, n:] = torch.arange(longest - n)
        else:
            mask[row, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens of a collated batch that are not padding: the attention mask's sum, or for packed rows (no mask)
    every position before the padding tail. A padding tail is the row's last sequence (position ids restart at 0
    there) when all its labels are IGNORE_INDEX: every real example has a learned token, so it cannot be one."""
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    positions, labels = batch["position_ids"], batch["labels"]
    length = positions.shape[1]
    index = torch.arange(length, device=positions.device).expand_as(positions)
    last_start = torch.where(positions == 0, index, torch.zeros_like(index)).amax(dim=1, keepdim=True)
    tail_learns = ((labels != IGNORE_INDEX) & (index >= last_start)).any(dim=1)
    lengths = torch.where(tail_learns, torch.full_like(last_start[:, 0], length), last_start[:, 0])
    return lengths.sum()
