"""The one greedy token-budget packer: rows -> batches whose padded size rows x max_len fits a budget.

    pack(range(len(lengths)), lengths, token_budget=32768)   # the hf engine's scoring/generation batches
    pack(rank_rows, lengths, token_budget)                   # the trainer's micro-batches (trainer/batching.py)
"""
from __future__ import annotations

from typing import Iterable, Sequence


def pack(indices: Iterable[int], lengths: Sequence, token_budget: int) -> list[list[int]]:
    """Greedy packing of rows (longest first) into batches of rows x max_len <= token_budget.

    lengths[i] (any int-like: a list or a tensor) is row i's length. A row longer than the budget
    gets a batch of its own. Deterministic: ties keep input order.
    """
    order = sorted(indices, key=lambda i: -int(lengths[i]))
    out: list[list[int]] = []
    for i in order:
        # sorted descending, so the first row of a batch is its longest
        if out and (len(out[-1]) + 1) * int(lengths[out[-1][0]]) <= token_budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out
