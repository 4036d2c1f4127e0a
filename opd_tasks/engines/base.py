"""The small interface every rollout and scoring backend implements.

Token ids in, token ids out: engines never re-tokenize text. Log-probs are in
response-token indexing: element j is log p(response_ids[j] | prompt_ids + response_ids[:j]).
Engines never touch storage.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy decoding (evaluation)
    top_p: float = 1.0      # 1.0: no truncation (unbiased behaviour log-probs)
    top_k: int = -1         # -1: disabled
    max_new_tokens: int = 32
    seed: int = 0           # generation is a deterministic function of (weights, prompts, seed)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    """One sampled response. behaviour_logp[j] is the log-prob of response_ids[j] under the
    distribution that sampled it (temperature applied, as recorded in SamplingParams)."""
    response_ids: list[int]
    behaviour_logp: np.ndarray  # [len(response_ids)] float32
    finish_reason: str          # "stop" (EOS) or "length"


@dataclass
class TopKScores:
    """One response scored with its top-k (Scorer.score_topk). logp: [R] float32 as score();
    ids: [R, K] int32, the K most likely tokens at the position predicting response token j;
    topk_logp: [R, K] float32 their log-probs, largest first, ties broken by the smaller id."""
    logp: np.ndarray
    ids: np.ndarray
    topk_logp: np.ndarray

    @classmethod
    def empty(cls, k: int) -> "TopKScores":
        return cls(np.zeros(0, np.float32), np.zeros((0, k), np.int32), np.zeros((0, k), np.float32))


def sorted_topk(entries: Sequence[tuple[int, float]], k: int) -> tuple[list[int], list[float]] | None:
    """The k best (id, log-prob) pairs of one position from an engine's answer: largest first,
    ties by the smaller id; None when fewer than k are given (the engine cannot return k)."""
    if len(entries) < k:
        return None
    best = sorted(entries, key=lambda e: (-e[1], e[0]))[:k]
    return [int(i) for i, _ in best], [float(v) for _, v in best]


class Generator(Protocol):
    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        """n samples per prompt: result[i][g] is sample g of prompt i."""
        ...

    def load_weights(self, path: str) -> None:
        """Swap in new weights (an HF export directory) in place, without rebuilding the engine."""
        ...


class Scorer(Protocol):
    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token log-probs (float32, temperature 1) of each response given its prompt."""
        ...

    def score_topk(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   k: int) -> list[TopKScores]:
        """score() plus the k most likely tokens and their log-probs at every response position."""
        ...
