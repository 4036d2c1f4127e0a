"""Greedy per-domain accuracy on a generation engine: the evaluation stage's work, free of Prefect and storage.

    acc = evaluate(gen, tokenizer, rows, max_new_tokens=16)             # any Generator (hf, vllm, remote)
    acc = greedy_accuracy("path/to/hf_model", rows, max_new_tokens=16)  # {"add": 0.91, "rev": 0.97}

rows: a list of dicts or a pyarrow Table with columns prompt (or messages), answer, domain
(domain may be None: then the `exact` verifier, reported under "default"). Prompts become token ids
with opd_tasks.prompts.encode_prompts, exactly as in rollout (chat template included); decoding is
the rollout engine's Generator at temperature 0 (greedy), one sample per prompt, until EOS or
max_new_tokens: the hf engine batches by its token_budget, vLLM schedules the batch itself.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping, Sequence

from opd_tasks.engines.base import Generator, SamplingParams
from opd_tasks.errors import DataError
from opd_tasks.prompts import encode_prompts
from opd_tasks.verifiers import NONE, check_domains, find_verifier

REQUIRED = ("answer", "domain")


def _as_rows(rows: Any) -> list[dict]:
    if hasattr(rows, "to_pylist"):  # pyarrow Table
        names = rows.column_names
        rows = rows.to_pylist()
    else:
        rows = list(rows)
        names = sorted({c for r in rows for c in r})
    if not rows:
        raise DataError("evaluation rows are empty; give at least one row with prompt, answer, domain")
    missing = [c for c in REQUIRED if c not in names or any(c not in r for r in rows)]
    if not ({"prompt", "messages"} & set(names)):
        missing = ["prompt (or messages)"] + missing
    if missing:
        raise DataError(f"evaluation rows lack columns {missing}; each row needs prompt (or messages), "
                        f"{', '.join(REQUIRED)}")
    return rows


def verified_rows(rows: Any, verifiers: Mapping[str, str] | None = None) -> tuple[list[dict], int]:
    """(rows to evaluate, how many were left out): rows of domains that data.verifiers declares
    `none` are left out; any other domain without a verifier is a NoVerifierError."""
    rows = _as_rows(rows)
    verifiers = verifiers or {}
    keep = [r for r in rows if r["domain"] is None or verifiers.get(r["domain"]) != NONE]
    check_domains([r["domain"] for r in keep], verifiers, "evaluation")
    if not keep:
        raise DataError("evaluation: every eval row's domain is declared without a verifier (data.verifiers: "
                        "none); give eval prompts of a verified domain or set eval.every: 0")
    return keep, len(rows) - len(keep)


def greedy_responses(gen: Generator, tokenizer, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> list[str]:
    """Greedy response text of each prompt without its final EOS, in the order of `prompt_ids`.
    Other special tokens are kept: a stray <bos> inside an answer makes it wrong, not silently right."""
    samples = gen.generate(prompt_ids, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    eos = {tokenizer.eos_token_id, *getattr(gen, "eos_ids", ())}
    out = []
    for (s,) in samples:
        ids = list(s.response_ids)
        if s.finish_reason == "stop" and ids and ids[-1] in eos:
            ids = ids[:-1]  # the EOS the engine stopped at (another stop token is left to the verifiers'
            # normalize(), which strips end-of-sequence markers)
        out.append(tokenizer.decode(ids, skip_special_tokens=False))
    return out


def accuracy_by_domain(rows: Sequence[dict], responses: Sequence[str],
                       verifiers: Mapping[str, str] | None = None) -> dict[str, float]:
    """Mean verifier reward per domain (key "default" for rows without a domain)."""
    totals: dict[str, list[float]] = defaultdict(list)
    for row, response in zip(rows, responses, strict=True):
        verify = find_verifier(row["domain"], verifiers)
        if verify is None:
            check_domains([row["domain"]], verifiers, "evaluation")
        totals[row["domain"] or "default"].append(verify(response, row["answer"]))
    return {d: sum(v) / len(v) for d, v in sorted(totals.items())}


def evaluate(gen: Generator, tokenizer, rows: Any, max_new_tokens: int, chat_template: bool = False,
             verifiers: Mapping[str, str] | None = None, limit: int | None = None, limit_why: str = "",
             source: str = "eval") -> dict[str, float]:
    """{domain: accuracy in [0, 1]} of greedy decoding with `gen` on `rows` (see verified_rows for
    domains without a verifier; `limit`: most prompt tokens, see encode_prompts)."""
    rows, _ = verified_rows(rows, verifiers)
    ids = encode_prompts(tokenizer, rows, chat_template, source, limit=limit, limit_why=limit_why)
    return accuracy_by_domain(rows, greedy_responses(gen, tokenizer, ids, max_new_tokens), verifiers)


def greedy_accuracy(model_path: str, rows: Any, max_new_tokens: int = 32, token_budget: int = 16384,
                    num_threads: int | None = None, engine: str = "hf", chat_template: bool = False,
                    **engine_opts: Any) -> dict[str, float]:
    """evaluate() with a fresh `engine` generator of the model at `model_path` and its tokenizer.
    num_threads: torch threads for this call only (the previous setting is restored);
    engine_opts: make_generator options (device, dtype, vllm, ...)."""
    import torch

    from opd_tasks.engines import make_generator
    from opd_tasks.models import load_tokenizer
    rows = _as_rows(rows)
    before = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        tok = load_tokenizer(model_path, engine_opts.get("trust_remote_code", False))
        gen = make_generator(engine, model_path, token_budget=token_budget, progress=False, **engine_opts)
        return evaluate(gen, tok, rows, max_new_tokens, chat_template=chat_template, source=str(model_path))
    finally:
        torch.set_num_threads(before)
