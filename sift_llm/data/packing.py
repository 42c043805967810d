"""Packing: whole examples share a ``max_length`` sequence and stay apart.

Each packed sequence carries ``position_ids`` that restart at 0 for every example. transformers reads
restarting position ids as packed sequences when no ``attention_mask`` is given, and then builds a causal mask
that never crosses an example boundary (``masking_utils.find_packed_sequence_indices``; sdpa and eager), so
each example is computed as if it were alone. The label of every example's first token is -100: otherwise the
previous example's last token would be trained to predict it across the boundary. (Unpacked, that label is
never used either: the loss shifts labels by one.) Examples are never split; one longer than ``max_length``
cannot occur, the truncation policy ran first.

Bins are filled best-fit decreasing (each example, longest first, goes into the fullest sequence it fits),
ties in length broken by a seeded shuffle, and the packed sequences are put in a seeded order: the result
depends on the examples, ``max_length`` and the seed only.
"""

from __future__ import annotations

import bisect
import random

from sift_llm.data.encode import IGNORE_INDEX


def pack_order(lengths: list[int], max_length: int, seed: int) -> list[list[int]]:
    """Example indices per packed sequence (best-fit decreasing), in a seeded order of sequences."""
    rng = random.Random(seed)
    tiebreak = list(range(len(lengths)))
    rng.shuffle(tiebreak)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], tiebreak[i]))
    bins: list[list[int]] = []
    free: list[int] = []  # sorted room left in the open bins, parallel to ``owners``
    owners: list[int] = []
    for index in order:
        size = lengths[index]
        if size > max_length:
            raise ValueError(f"example {index} has {size} tokens, over max_length {max_length}")
        at = bisect.bisect_left(free, size)
        if at < len(free):
            room, owner = free.pop(at), owners.pop(at)
            bins[owner].append(index)
            room -= size
        else:
            owner = len(bins)
            bins.append([index])
            room = max_length - size
        if room > 0:
            at = bisect.bisect_left(free, room)
            free.insert(at, room)
            owners.insert(at, owner)
    rng.shuffle(bins)
    return bins


def pack(examples: list[tuple[list[int], list[int]]], max_length: int, seed: int) -> list[dict]:
    """Packed sequences as ``{input_ids, labels, position_ids}`` dicts (see the module docstring)."""
    packed = []
    for members in pack_order([len(ids) for ids, _ in examples], max_length, seed):
        ids, labels, positions = [], [], []
        for index in members:
            example_ids, example_labels = examples[index]
            ids.extend(example_ids)
            labels.append(IGNORE_INDEX)
            labels.extend(example_labels[1:])
            positions.extend(range(len(example_ids)))
        packed.append({"input_ids": ids, "labels": labels, "position_ids": positions})
    return packed


def packing_stats(packed: list[dict], examples: int, max_length: int) -> dict:
    tokens = sum(len(p["input_ids"]) for p in packed)
    return {
        "sequences": len(packed),
        "examples": examples,
        "examples_per_sequence": round(examples / len(packed), 3) if packed else None,
        "fill": round(tokens / (len(packed) * max_length), 4) if packed else None,
    }
