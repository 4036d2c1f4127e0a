"""The toy world's task domains and prompt datasets.

    add: "add 482+039=" -> "0521"   (operands zero-padded to max_digits, the sum to max_digits + 1)
    rev: "rev kqzta="   -> "atzqk"  (min_letters..max_letters lowercase letters)

Why fixed-width addition: with digits aligned by position, a 2-layer model learns 3-digit addition
in ~600-800 SFT steps (95% greedy); with "add 482+39=" -> "521" it was at ~20% after 800 steps of
2-digit addition, too slow for a world built in minutes on a CPU.

A response is the answer followed by <eos>. Datasets are rows {prompt_id, prompt, answer, domain}:
unique prompts, train and eval disjoint, domains interleaved (so any prefix of a split, e.g.
eval.max_prompts, holds every domain in equal parts). Everything is a function of the seed.
"""
from __future__ import annotations

import os
import random
import string
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

DOMAINS = ("add", "rev")
COLUMNS = ("prompt_id", "prompt", "answer", "domain")


@dataclass(frozen=True)
class TaskSpec:
    max_digits: int = 3     # add: each operand has 1..max_digits digits
    min_letters: int = 3    # rev: word length range
    max_letters: int = 6


def make_example(domain: str, rng: random.Random, spec: TaskSpec) -> tuple[str, str]:
    """One (prompt, answer) of `domain`, drawn with `rng`."""
    if domain == "add":
        n = spec.max_digits  # operand sizes vary (1..n digits) so small and large sums both occur
        a, b = (rng.randrange(10 ** rng.randint(1, n)) for _ in range(2))
        return f"add {a:0{n}d}+{b:0{n}d}=", f"{a + b:0{n + 1}d}"
    if domain == "rev":
        word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(spec.min_letters, spec.max_letters)))
        return f"rev {word}=", word[::-1]
    raise ValueError(f"unknown toy domain {domain!r}; toy domains: {DOMAINS}")


def make_splits(spec: TaskSpec, n_train: int, n_eval: int, seed: int, n_dev: int = 0) -> dict[str, list[dict]]:
    """{"eval", "dev" (when n_dev), "train"}: n_* prompts per domain, unique and disjoint across splits.
    eval is drawn first, so it does not depend on n_dev or n_train."""
    rng = random.Random(f"toy-data-{seed}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in (("eval", n_eval), ("dev", n_dev), ("train", n_train)):
        if split == "dev" and not n:
            continue
        per_domain = {}
        for domain in DOMAINS:
            rows = []
            for _ in range(1000 * n + 1000):  # bounded: a spec too small to hold n unique prompts fails
                if len(rows) == n:
                    break
                prompt, answer = make_example(domain, rng, spec)
                if prompt not in seen:
                    seen.add(prompt)
                    rows.append((prompt, answer))
            if len(rows) < n:
                raise ValueError(f"toy {split} split: only {len(rows)} unique {domain!r} prompts, {n} wanted")
            per_domain[domain] = rows
        interleaved = [per_domain[d][i] + (d,) for i in range(n) for d in DOMAINS]
        splits[split] = [dict(prompt_id=f"{split}-{i:06d}", prompt=p, answer=a, domain=d)
                         for i, (p, a, d) in enumerate(interleaved)]
    return splits


class SFTSampler:
    """Endless supervised examples (prompt, answer, domain), never a prompt in `exclude`; the domain
    weights may change from one batch to the next."""

    def __init__(self, spec: TaskSpec, exclude: set[str], seed: int):
        self.spec, self.exclude = spec, exclude
        self.rng = random.Random(f"toy-sft-{seed}")

    def batch(self, n: int, weights: dict[str, float]) -> list[tuple[str, str, str]]:
        domains = sorted(d for d, w in weights.items() if w > 0)
        out = []
        for domain in self.rng.choices(domains, [weights[d] for d in domains], k=n):
            while True:  # redraw within the domain: exclusions must not shift the domain mix
                prompt, answer = make_example(domain, self.rng, self.spec)
                if prompt not in self.exclude:
                    out.append((prompt, answer, domain))
                    break
        return out


def write_rows(rows: list[dict], path: Path) -> None:
    """Write rows as Parquet (columns COLUMNS, all strings) atomically: temp file, then rename."""
    table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in COLUMNS})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)
