"""Greedy per-domain accuracy of a checkpoint: the evaluation stage's work, free of Prefect and storage.

    acc = greedy_accuracy("path/to/hf_model", rows, max_new_tokens=16)   # {"add": 0.91, "rev": 0.97}

rows: a list of dicts or a pyarrow Table with columns prompt, answer, domain (domain may be None:
then the `exact` verifier, reported under "default"). Prompts are tokenized with the model's own
tokenizer (special tokens on, as in rollout), left-padded, batched by a token budget after sorting
by length, and decoded greedily (do_sample=False) until EOS or max_new_tokens.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import torch

from opd_tasks.errors import DataError, ModelPathError
from opd_tasks.verifiers import get_verifier

REQUIRED = ("prompt", "answer", "domain")


def _as_rows(rows: Any) -> list[dict]:
    if hasattr(rows, "to_pylist"):  # pyarrow Table
        missing = [c for c in REQUIRED if c not in rows.column_names]
        rows = rows.to_pylist()
    else:
        rows = list(rows)
        missing = sorted({c for r in rows for c in REQUIRED if c not in r})
    if missing:
        raise DataError(f"evaluation rows lack columns {missing}; each row needs {list(REQUIRED)}")
    if not rows:
        raise DataError("evaluation rows are empty; give at least one row with prompt, answer, domain")
    return rows


def load_model(model_path: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """(model in eval mode, tokenizer) from an HF directory or URL (opd_tasks.models: safetensors
    only); ModelPathError when it holds none."""
    from opd_tasks.models import load_causal_lm, load_tokenizer
    return (load_causal_lm(model_path, dtype, trust_remote_code=trust_remote_code),
            load_tokenizer(model_path, trust_remote_code))


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                    token_budget: int = 16384) -> list[str]:
    """Greedy response text of each prompt up to (without) its first EOS, in the order of `prompts`.

    Batches hold at most `token_budget` padded tokens (prompt + max_new_tokens per row).
    """
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ModelPathError(f"tokenizer {tokenizer.name_or_path!r} has no pad or eos token; set both")
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[str] = [""] * len(ids)
    start = 0
    while start < len(order):
        end = start + 1  # grow the batch while its padded size fits the budget
        while end < len(order) and (end + 1 - start) * (len(ids[order[end]]) + max_new_tokens) <= token_budget:
            end += 1
        batch = [ids[i] for i in order[start:end]]
        width = max(map(len, batch))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad)
        eos = tokenizer.eos_token_id
        for i, row in zip(order[start:end], gen[:, width:].tolist()):
            row = row[: row.index(eos)] if eos in row else row
            # keep other special tokens: a stray <bos> inside an answer makes it wrong, not silently right
            out[i] = tokenizer.decode(row, skip_special_tokens=False)
        start = end
    return out


def accuracy_by_domain(rows: Sequence[dict], responses: Sequence[str]) -> dict[str, float]:
    """Mean verifier reward per domain (key "default" for rows without a domain)."""
    totals: dict[str, list[float]] = defaultdict(list)
    for row, response in zip(rows, responses, strict=True):
        totals[row["domain"] or "default"].append(get_verifier(row["domain"])(response, row["answer"]))
    return {d: sum(v) / len(v) for d, v in sorted(totals.items())}


def greedy_accuracy(model_path: str, rows: Any, max_new_tokens: int = 32, token_budget: int = 16384,
                    num_threads: int | None = None, trust_remote_code: bool = False) -> dict[str, float]:
    """{domain: accuracy in [0, 1]} of greedy decoding of the model at `model_path` on `rows`.
    num_threads: torch threads for this call only (the previous setting is restored)."""
    rows = _as_rows(rows)
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        model, tok = load_model(model_path, trust_remote_code=trust_remote_code)
        responses = greedy_generate(model, tok, [r["prompt"] for r in rows], max_new_tokens, token_budget)
    finally:
        torch.set_num_threads(before)
    return accuracy_by_domain(rows, responses)
