"""Offline scoring: an existing dataset of prompts + responses -> scored Parquet shards.

    score_offline(cfg, "data/responses.parquet", "runs/x")      # -> runs/x/offline/scored/
    score_offline(cfg, "data/responses.jsonl", "scored/")        # -> scored/ (a plain directory)

Input columns: either token ids (`prompt_ids`, `response_ids`) or texts (`prompt`, `response`),
plus optional `sample_id`, `prompt_id`, `domain`, `reward`. Texts are tokenized once with the
student's tokenizer (the response without special tokens, then EOS appended) and the ids are what
is stored and scored, so the shard says exactly what was scored. behaviour_logp stays null:
nobody sampled these responses from the student.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import time

import numpy as np
import pyarrow as pa

from opd_tasks.config import RunConfig
from opd_tasks.errors import DataError
from opd_tasks.models import load_tokenizer
from opd_tasks.scoring import check_tokenizers, get_scorers, score_table, teacher_provenance
from opd_tasks.stages import StageResult
from storage.datasets import read_table
from storage.fs import exists, filesystem
from storage.layout import RunLayout
from storage.manifest import read_manifest
from storage.shards import build_provenance, commit_parts, finished_parts, rollout_table, write_part

log = logging.getLogger("opd.offline")


def output_stage_dir(output: str) -> tuple[object, str]:
    """A run directory (holds run.yaml) -> RUN/offline/scored; anything else is the stage dir itself."""
    layout = RunLayout(output)
    if exists(layout.fs, layout.run_yaml):
        return layout.fs, layout.offline_dir("scored")
    fs, path = filesystem(output)
    return fs, path.rstrip("/")


def _ids_column(table: pa.Table, name: str, source: str) -> list[np.ndarray]:
    out = []
    for i, v in enumerate(table.column(name).to_pylist()):
        if v is None:
            raise DataError(f"{source}: row {i} has a null {name!r}; every row needs token ids")
        out.append(np.asarray(v, np.int32))
    return out


def to_rollout_table(table: pa.Table, tokenizer, source: str) -> tuple[pa.Table, dict]:
    """Normalize a user dataset into the rollout schema; returns (table, how it was tokenized)."""
    cols = set(table.column_names)
    if {"prompt_ids", "response_ids"} <= cols:
        prompts, responses = _ids_column(table, "prompt_ids", source), _ids_column(table, "response_ids", source)
        how = {"input": "token ids"}
    elif {"prompt", "response"} <= cols:
        eos = tokenizer.eos_token_id
        p_txt, r_txt = table.column("prompt").to_pylist(), table.column("response").to_pylist()
        prompts = [np.asarray(x, np.int32) for x in tokenizer(p_txt, add_special_tokens=True)["input_ids"]]
        responses = [np.asarray(x + ([eos] if eos is not None else []), np.int32)
                     for x in tokenizer(r_txt, add_special_tokens=False)["input_ids"]]
        how = {"input": "text", "tokenizer": tokenizer.name_or_path, "response_eos_appended": eos is not None}
    else:
        raise DataError(f"{source}: needs columns prompt_ids + response_ids (token ids) or prompt + response "
                        f"(text); found {sorted(cols)}")
    if not prompts:
        raise DataError(f"{source}: the dataset is empty")
    empty = [i for i, r in enumerate(responses) if len(r) == 0]
    if empty:
        raise DataError(f"{source}: {len(empty)} row(s) have an empty response (first: row {empty[0]}); "
                        f"drop them: there is no token to score")
    n = len(prompts)
    sample_id = (table.column("sample_id").cast(pa.string()).to_pylist() if "sample_id" in cols
                 else [f"s{i:09d}" for i in range(n)])
    prompt_id = (table.column("prompt_id").cast(pa.string()).to_pylist() if "prompt_id" in cols
                 else [hashlib.sha1(p.tobytes()).hexdigest()[:16] for p in prompts])
    out = rollout_table({
        "sample_id": sample_id, "prompt_id": prompt_id, "group_index": np.zeros(n, np.int32),
        "domain": table.column("domain").cast(pa.string()) if "domain" in cols else None,
        "prompt_ids": prompts, "response_ids": responses, "behaviour_logp": pa.nulls(n, pa.list_(pa.float32())),
        "finish_reason": ["offline"] * n,
        "reward": table.column("reward").cast(pa.float32()) if "reward" in cols else None,
        "iteration": -1,
    })
    return out, how


def score_offline(cfg: RunConfig, input_path: str, output: str, rows_per_part: int | None = None) -> StageResult:
    """Score `input_path` with cfg's teachers (and reference when the loss needs it) into `output`."""
    t0 = time.perf_counter()
    fs, stage = output_stage_dir(output)
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-scored", rows=m.rows, skipped=True)
    student = cfg.student.path
    tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
    table, how = to_rollout_table(read_table(input_path), tokenizer, input_path)
    with_ref = cfg.needs_reference
    ref_path = cfg.reference.path if cfg.reference else student
    fingerprint = check_tokenizers(cfg, student, with_ref, ref_path)
    prov = build_provenance("scored", iteration=None, config_hash=cfg.config_hash(), teachers=teacher_provenance(cfg),
                            combination=cfg.combination, tokenizer_path=student, tokenizer_fingerprint=fingerprint,
                            student_checkpoint=student, source=input_path, tokenization=how,
                            reference=ref_path if with_ref else None)
    per = rows_per_part or cfg.rollout.rows_per_part
    done = finished_parts(fs, stage, expect={"config_hash": cfg.config_hash()})
    scorers, tokens = None, 0
    for k in range(-(-table.num_rows // per)):
        if k in done:
            continue
        scorers = scorers or get_scorers(cfg, with_ref, ref_path)
        part = score_table(table.slice(k * per, per), scorers, cfg, with_ref)
        tokens += sum(len(r) for r in part.column("response_ids").to_pylist())
        done[k] = write_part(fs, stage, k, part, prov, vocab_size=len(tokenizer))
        log.info("offline scoring: part %d (%d rows)", k, part.num_rows)
    m = commit_parts(fs, stage, "scored", done, cfg.config_hash(),
                     inputs={"dataset": input_path, "teachers": teacher_provenance(cfg), **how})
    return StageResult(stage="offline-scored", rows=m.rows, seconds=time.perf_counter() - t0, tokens=tokens,
                       metrics={"output": posixpath.join(fs.unstrip_protocol(stage)) if "://" in output else stage})
