"""A user dataset (token ids or texts) -> rollout-shaped rows; the offline phase's dataset import.

    table, how = to_rollout_table(read_table("data/responses.parquet"), tokenizer, source)
    import_dataset(ctx)          # offline.dataset -> RUN/offline/rollout parts (iteration -1)

Column rules: see opd_tasks/offline/__init__.py.
"""
from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import pyarrow as pa

from opd_tasks.context import RunContext
from opd_tasks.errors import DataError
from opd_tasks.models import load_tokenizer
from opd_tasks.stages import Parts, StageResult, write_stage
from opd_tasks.verifiers import check_domains, find_verifier
from storage.datasets import read_table
from storage.layout import OFFLINE_ITERATION
from storage.shards import build_provenance, rollout_table


def _row(table: pa.Table, i: int) -> str:
    """'row I (sample_id S)' of an input dataset: I counts from 0 over the whole file."""
    if "sample_id" in table.column_names:
        return f"row {i} (sample_id {table.column('sample_id')[i].as_py()!r})"
    return f"row {i} (sample_id 's{i:09d}' as assigned)"


def _ids_column(table: pa.Table, name: str, source: str) -> list[np.ndarray]:
    out = []
    for i, v in enumerate(table.column(name).to_pylist()):
        if v is None:
            raise DataError(f"{source}: {_row(table, i)} has a null {name!r}; every row needs token ids")
        out.append(np.asarray(v, np.int32))
    return out


def to_rollout_table(table: pa.Table, tokenizer, source: str, chat_template: bool = False,
                     verifiers: dict | None = None) -> tuple[pa.Table, dict]:
    """Normalize a user dataset into the rollout schema; returns (table, how it was tokenized).
    Text prompts (or `messages`) become ids with opd_tasks.prompts.encode_prompts, as in rollout."""
    from opd_tasks.prompts import encode_prompts
    cols = set(table.column_names)
    if {"prompt_ids", "response_ids"} <= cols:
        prompts, responses = _ids_column(table, "prompt_ids", source), _ids_column(table, "response_ids", source)
        how = {"input": "token ids"}
    elif "response" in cols and cols & {"prompt", "messages"}:
        eos = tokenizer.eos_token_id
        r_txt = table.column("response").to_pylist()
        if None in r_txt:
            raise DataError(f"{source}: row {r_txt.index(None)} has a null 'response'; every row needs one")
        prompt_rows = [{"prompt": r.get("prompt"), "messages": r.get("messages")}
                       for r in table.select([c for c in ("prompt", "messages") if c in cols]).to_pylist()]
        prompts = [np.asarray(x, np.int32) for x in encode_prompts(tokenizer, prompt_rows, chat_template, source)]
        responses = [np.asarray(x + ([eos] if eos is not None else []), np.int32)
                     for x in tokenizer(r_txt, add_special_tokens=False)["input_ids"]]
        how = {"input": "text", "tokenizer": tokenizer.name_or_path, "response_eos_appended": eos is not None}
        if chat_template or "messages" in cols:
            how["chat_template"] = True
    else:
        raise DataError(f"{source}: needs columns prompt_ids + response_ids (token ids) or prompt (or messages) "
                        f"+ response (text); found {sorted(cols)}")
    if not prompts:
        raise DataError(f"{source}: the dataset is empty")
    empty = [i for i, r in enumerate(responses) if len(r) == 0]
    if empty:
        raise DataError(f"{source}: {len(empty)} row(s) have an empty response (first: {_row(table, empty[0])}); "
                        f"drop them: there is no token to score")
    n = len(prompts)
    reward = table.column("reward").cast(pa.float32()) if "reward" in cols else None
    if reward is None and "answer" in cols:  # the domain verifier's reward, as in a rollout
        answers = table.column("answer").cast(pa.string()).to_pylist()
        domains = table.column("domain").cast(pa.string()).to_pylist() if "domain" in cols else [None] * n
        texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        verify = [None if a is None else find_verifier(d, verifiers) for a, d in zip(answers, domains)]
        reward = [None if v is None else float(v(t, a)) for v, t, a in zip(verify, texts, answers)]
        how["reward"] = "verifier"
    sample_id = (table.column("sample_id").cast(pa.string()).to_pylist() if "sample_id" in cols
                 else [f"s{i:09d}" for i in range(n)])
    prompt_id = (table.column("prompt_id").cast(pa.string()).to_pylist() if "prompt_id" in cols
                 else [hashlib.sha1(p.tobytes()).hexdigest()[:16] for p in prompts])
    out = rollout_table({
        "sample_id": sample_id, "prompt_id": prompt_id, "group_index": np.zeros(n, np.int32),
        "domain": table.column("domain").cast(pa.string()) if "domain" in cols else None,
        "prompt_ids": prompts, "response_ids": responses, "behaviour_logp": pa.nulls(n, pa.list_(pa.float32())),
        "finish_reason": ["offline"] * n,
        "reward": reward,
        "iteration": OFFLINE_ITERATION,
    })
    return out, how


def table_parts(table: pa.Table, rows_per_part: int) -> tuple[list[int], Callable[[int], pa.Table]]:
    """(part indices, k -> rows of part k) of a table cut into parts of rows_per_part rows."""
    return list(range(-(-table.num_rows // rows_per_part))), lambda k: table.slice(k * rows_per_part, rows_per_part)


def import_dataset(ctx: RunContext) -> StageResult:
    """offline.dataset (prompt+response as text or ids) -> RUN/offline/rollout parts (iteration -1)."""
    cfg, source = ctx.cfg, ctx.cfg.offline.dataset

    def plan() -> Parts:
        tokenizer = load_tokenizer(cfg.student.path, cfg.student.trust_remote_code, role="student")
        raw = read_table(source)
        if (cfg.offline.filter.min_reward is not None and "reward" not in raw.column_names
                and "answer" in raw.column_names):
            domains = raw.column("domain").to_pylist() if "domain" in raw.column_names else [None]
            check_domains(domains, cfg.data.verifiers, "offline.filter.min_reward")
        table, how = to_rollout_table(raw, tokenizer, source, cfg.data.chat_template, cfg.data.verifiers)
        prov = build_provenance("rollout", iteration=OFFLINE_ITERATION, config_hash=ctx.config_hash,
                                tokenizer_path=cfg.student.path, student_checkpoint=None, source=source,
                                tokenization=how)
        keys, rows_of = table_parts(table, cfg.rollout.rows_per_part)
        return Parts(keys=keys, make=lambda k: (rows_of(k), prov), inputs={"dataset": source, **how},
                     extra={"source": "dataset"}, vocab_size=len(tokenizer), label="offline dataset import")

    return write_stage(ctx.layout.fs, ctx.offline_dir("rollout"), name="offline-rollout", kind="rollout",
                       iteration=OFFLINE_ITERATION, config_hash=ctx.config_hash, plan=plan)
