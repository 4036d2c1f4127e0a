"""Offline data: an existing dataset (or teacher-generated rollouts) -> scored shards -> kept rows.

    score_offline(cfg, "data/responses.parquet", "runs/x")      # `opd score`: -> runs/x/offline/scored/
    score_offline(cfg, "data/responses.jsonl", "scored/")        # -> scored/ (a plain directory)

The offline phase of a run (flows/offline.py), each step a stage under RUN/offline/ with a manifest:
    import_dataset(ctx)          offline.dataset -> offline/rollout (source: dataset; or
                                 opd_tasks.rollout.run_offline_generation for source: generate)
    run_offline_scoring(ctx)     offline/rollout -> offline/scored (every teacher + the combination)
    run_offline_filter(ctx)      offline/scored -> offline/filter/decisions.json: kept or dropped + why
    (the trainer, iteration -1)  kept rows -> sft -> checkpoints/offline (iteration 0's student)
    run_offline_evaluation(ctx)  greedy accuracy of the warm-started student -> offline/evaluation

Input columns: either token ids (`prompt_ids`, `response_ids`) or texts (`prompt`, `response`),
plus optional `sample_id`, `prompt_id`, `domain`, `reward`, `answer` (a reward from the domain
verifier when `reward` is absent). Texts are tokenized once with the student's tokenizer (the
response without special tokens, then EOS appended) and the ids are what is stored and scored, so
the shard says exactly what was scored. behaviour_logp stays null: nobody sampled these responses
from the student.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import posixpath
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.config import OfflineFilterConfig, RunConfig
from opd_tasks.context import RunContext
from opd_tasks.errors import DataError, OpdError
from opd_tasks.models import load_tokenizer
from opd_tasks.scoring import check_tokenizers, get_scorers, score_table, teacher_provenance
from opd_tasks.stages import StageResult
from opd_tasks.verifiers import get_verifier
from storage.datasets import read_table
from storage.fs import exists, filesystem
from storage.layout import RunLayout
from storage.manifest import (Manifest, commit_manifest, read_manifest, read_part_verified, remove_tmp_files,
                              write_json_part)
from storage.shards import (build_provenance, commit_parts, finished_parts, part_index, read_part, read_stage,
                            rollout_table, write_part)

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
    reward = table.column("reward").cast(pa.float32()) if "reward" in cols else None
    if reward is None and "answer" in cols:  # the domain verifier's reward, as in a rollout
        answers = table.column("answer").cast(pa.string()).to_pylist()
        domains = table.column("domain").cast(pa.string()).to_pylist() if "domain" in cols else [None] * n
        texts = tokenizer.batch_decode([r.tolist() for r in responses], skip_special_tokens=True)
        reward = [None if a is None else float(get_verifier(d)(t, a)) for t, a, d in zip(texts, answers, domains)]
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
                            reference=ref_path if with_ref else None, top_k=cfg.scoring.top_k or None)
    per = rows_per_part or cfg.rollout.rows_per_part
    done = finished_parts(fs, stage, expect={"config_hash": cfg.config_hash()})
    scorers, tokens = None, 0
    for k in range(-(-table.num_rows // per)):
        if k in done:
            continue
        scorers = scorers or get_scorers(cfg, with_ref, ref_path)
        part = score_table(table.slice(k * per, per), scorers, cfg, with_ref, ref_path)
        tokens += sum(len(r) for r in part.column("response_ids").to_pylist())
        done[k] = write_part(fs, stage, k, part, prov, vocab_size=len(tokenizer))
        log.info("offline scoring: part %d (%d rows)", k, part.num_rows)
    m = commit_parts(fs, stage, "scored", done, cfg.config_hash(),
                     inputs={"dataset": input_path, "teachers": teacher_provenance(cfg), **how})
    return StageResult(stage="offline-scored", rows=m.rows, seconds=time.perf_counter() - t0, tokens=tokens,
                       metrics={"output": posixpath.join(fs.unstrip_protocol(stage)) if "://" in output else stage})


# ---- the offline phase of a run ----------------------------------------------------------------------

OFFLINE_ITERATION = -1
DECISIONS = "decisions.json"
REASONS = ("kept", "empty_response", "no_reward", "reward_below_min", "teacher_logp_below_min")


def import_dataset(ctx: RunContext) -> StageResult:
    """offline.dataset (prompt+response as text or ids) -> RUN/offline/rollout parts (iteration -1)."""
    t0 = time.perf_counter()
    fs, stage, cfg = ctx.layout.fs, ctx.offline_dir("rollout"), ctx.cfg
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-rollout", iteration=OFFLINE_ITERATION, rows=m.rows, skipped=True)
    source = cfg.offline.dataset
    tokenizer = load_tokenizer(cfg.student.path, cfg.student.trust_remote_code, role="student")
    table, how = to_rollout_table(read_table(source), tokenizer, source)
    prov = build_provenance("rollout", iteration=OFFLINE_ITERATION, config_hash=ctx.config_hash,
                            tokenizer_path=cfg.student.path, student_checkpoint=None, source=source, tokenization=how)
    per = cfg.rollout.rows_per_part
    done = finished_parts(fs, stage, expect={"config_hash": ctx.config_hash})
    remove_tmp_files(fs, stage)
    for k in range(-(-table.num_rows // per)):
        if k not in done:
            done[k] = write_part(fs, stage, k, table.slice(k * per, per), prov, vocab_size=len(tokenizer))
    m = commit_parts(fs, stage, "rollout", done, ctx.config_hash, inputs={"dataset": source, **how},
                     extra={"source": "dataset"})
    return StageResult(stage="offline-rollout", iteration=OFFLINE_ITERATION, rows=m.rows,
                       seconds=time.perf_counter() - t0)


def run_offline_scoring(ctx: RunContext) -> StageResult:
    """offline/rollout -> offline/scored: every teacher's log-probs and the combination, part by part
    (a resumed stage scores only the missing parts). No reference: the sft loss does not read it."""
    t0 = time.perf_counter()
    fs, cfg = ctx.layout.fs, ctx.cfg
    src, stage = ctx.offline_dir("rollout"), ctx.offline_dir("scored")
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-scored", iteration=OFFLINE_ITERATION, rows=m.rows, skipped=True)
    rollout = read_manifest(fs, src)
    if rollout is None:
        raise OpdError(f"{ctx.layout.url_of(src)}: the offline rollout stage is not complete; run it first "
                       f"(opd resume)")
    done = finished_parts(fs, stage, expect={"config_hash": ctx.config_hash})
    remove_tmp_files(fs, stage)
    todo = [(part_index(p.name), p) for p in rollout.parts if part_index(p.name) not in done]
    tokens = 0
    if todo:
        student = cfg.student.path
        fingerprint = check_tokenizers(cfg, student, False, student)
        scorers = get_scorers(cfg, False, student)
        prov = build_provenance("scored", iteration=OFFLINE_ITERATION, config_hash=ctx.config_hash,
                                teachers=teacher_provenance(cfg), combination=cfg.combination, tokenizer_path=student,
                                tokenizer_fingerprint=fingerprint, student_checkpoint=None,
                                engine=cfg.scoring.engine, source=rollout.extra.get("source"),
                                top_k=cfg.scoring.top_k or None)
        for k, part in todo:
            table = score_table(read_part(fs, src, part), scorers, cfg, False)
            tokens += int(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0)
            done[k] = write_part(fs, stage, k, table, prov)
            log.info("offline scoring part %s: %d samples", part.name, table.num_rows)
    m = commit_parts(fs, stage, "scored", done, ctx.config_hash,
                     inputs={"rollout": ctx.layout.url_of(src), "teachers": teacher_provenance(cfg)})
    return StageResult(stage="offline-scored", iteration=OFFLINE_ITERATION, rows=m.rows,
                       seconds=time.perf_counter() - t0, tokens=tokens)


def per_token_mean(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Mean of each row's list (float64 [N]); NaN for an empty list."""
    col = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
    flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float64)
    lens = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    sums = np.bincount(np.repeat(np.arange(len(lens)), lens), weights=flat, minlength=len(lens))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(lens > 0, sums / np.maximum(lens, 1), np.nan)


def filter_decisions(reward: list, teacher_logp_per_token: np.ndarray, response_len: np.ndarray,
                     flt: OfflineFilterConfig) -> tuple[list[bool], list[str]]:
    """Per row (kept, reason): the first rule a row breaks, in the order of REASONS: an empty
    response; with filter.min_reward, a missing reward or one below it; with
    filter.min_teacher_logp_per_token, a mean combined teacher log-prob per token below it."""
    kept, reasons = [], []
    for r, t, n in zip(reward, teacher_logp_per_token, response_len):
        if n == 0:
            why = "empty_response"
        elif flt.min_reward is not None and (r is None or not math.isfinite(r)):
            why = "no_reward"
        elif flt.min_reward is not None and r < flt.min_reward:
            why = "reward_below_min"
        elif flt.min_teacher_logp_per_token is not None and not t >= flt.min_teacher_logp_per_token:
            why = "teacher_logp_below_min"
        else:
            why = "kept"
        kept.append(why == "kept")
        reasons.append(why)
    return kept, reasons


def _json_float(x) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def run_offline_filter(ctx: RunContext) -> StageResult:
    """Decide, deterministically, which scored offline rows the warm start trains on; writes
    offline/filter/decisions.json (per row: sample_id, prompt_id, domain, reward,
    teacher_logp_per_token, response_len, kept, reason) and a manifest whose extra holds the
    counts by reason and by domain and the thresholds."""
    t0 = time.perf_counter()
    fs, stage = ctx.layout.fs, ctx.offline_dir("filter")
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-filter", iteration=OFFLINE_ITERATION, rows=m.extra.get("kept", 0),
                           skipped=True, metrics=dict(m.extra))
    flt = ctx.cfg.offline.filter
    cols = ["sample_id", "prompt_id", "domain", "reward", "response_ids", "teacher_logp"]
    table = read_stage(fs, ctx.offline_dir("scored"), columns=cols)
    tl = per_token_mean(table.column("teacher_logp"))
    lens = pc.list_value_length(table.column("response_ids")).to_numpy(zero_copy_only=False)
    reward = table.column("reward").to_pylist()
    kept, reasons = filter_decisions(reward, tl, lens, flt)
    counts = Counter(reasons)
    if not any(kept):
        best = np.nanmax(tl) if np.isfinite(tl).any() else None
        rewards = [r for r in reward if r is not None]
        raise DataError(f"{ctx.layout.url_of(stage)}: offline.filter keeps none of the {len(kept)} rows "
                        f"({dict(counts)}); loosen offline.filter (min_reward {flt.min_reward}, "
                        f"min_teacher_logp_per_token {flt.min_teacher_logp_per_token}); the best row's teacher "
                        f"log-prob per token is {best}, the largest reward {max(rewards) if rewards else None}")
    domains = table.column("domain").to_pylist()
    by_domain: dict[str, dict[str, int]] = {}
    for d, k in zip(domains, kept):
        entry = by_domain.setdefault(str(d), {"kept": 0, "dropped": 0})
        entry["kept" if k else "dropped"] += 1
    decisions = {"sample_id": table.column("sample_id").to_pylist(), "prompt_id": table.column("prompt_id").to_pylist(),
                 "domain": domains, "reward": [_json_float(r) for r in reward],
                 "teacher_logp_per_token": [_json_float(x) for x in tl], "response_len": [int(x) for x in lens],
                 "kept": kept, "reason": reasons}
    remove_tmp_files(fs, stage)
    part = write_json_part(fs, stage, DECISIONS, decisions)
    extra = {"rows": len(kept), "kept": int(sum(kept)), "dropped": len(kept) - int(sum(kept)),
             "reasons": {r: counts.get(r, 0) for r in REASONS}, "by_domain": by_domain,
             "filter": flt.model_dump()}
    commit_manifest(fs, stage, Manifest(stage="offline-filter", config_hash=ctx.config_hash, parts=[part],
                                        inputs={"scored": ctx.layout.url_of(ctx.offline_dir("scored"))}, extra=extra))
    return StageResult(stage="offline-filter", iteration=OFFLINE_ITERATION, rows=extra["kept"],
                       seconds=time.perf_counter() - t0, metrics=extra)


def read_decisions(fs, filter_dir: str) -> dict[str, list]:
    """The filter's per-row decisions (columns -> lists), checked against its manifest."""
    m = read_manifest(fs, filter_dir)
    if m is None:
        raise OpdError(f"{filter_dir}: the offline filter stage is not complete; run the offline phase "
                       f"(opd resume) before training on its rows")
    return json.loads(read_part_verified(fs, filter_dir, m.part(DECISIONS)))


def kept_rows(fs, scored_dir: str, table: pa.Table) -> pa.Table:
    """The rows of the offline scored table that the filter (its decisions in the sibling filter/
    directory) kept, in the table's order."""
    filter_dir = posixpath.join(posixpath.dirname(scored_dir.rstrip("/")), "filter")
    d = read_decisions(fs, filter_dir)
    keep = [s for s, k in zip(d["sample_id"], d["kept"]) if k]
    out = table.filter(pc.is_in(table.column("sample_id"), value_set=pa.array(keep, pa.string())))
    if out.num_rows != len(keep) or len(d["sample_id"]) != table.num_rows:
        raise OpdError(f"{filter_dir}: the filter's decisions ({len(d['sample_id'])} rows, {len(keep)} kept) do "
                       f"not match {scored_dir} ({table.num_rows} rows, {out.num_rows} of the kept found); "
                       f"delete {filter_dir} and resume to decide again")
    return out


def run_offline_evaluation(ctx: RunContext) -> StageResult:
    """Greedy per-domain accuracy of the warm-started student (checkpoints/offline/hf) on the eval
    split, when evaluation is on (eval.every > 0) -> offline/evaluation/metrics.json + manifest."""
    from opd_tasks.eval_stage import eval_prompts, read_baseline
    from opd_tasks.evaluate import greedy_accuracy
    from storage.checkpoints import warm_start_dir
    t0 = time.perf_counter()
    fs, stage = ctx.layout.fs, ctx.offline_dir("evaluation")
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="offline-evaluation", iteration=OFFLINE_ITERATION, skipped=True)
    remove_tmp_files(fs, stage)
    metrics: dict = {"iteration": OFFLINE_ITERATION, "scheduled": ctx.cfg.eval.every > 0}
    if metrics["scheduled"]:
        model = ctx.layout.url_of(warm_start_dir(ctx.layout))
        read_baseline(ctx)  # the initial student's accuracy, for comparison
        rows, e = eval_prompts(ctx), ctx.cfg.eval
        metrics.update(accuracy=greedy_accuracy(model, rows, max_new_tokens=e.max_new_tokens,
                                                token_budget=e.token_budget),
                       checkpoint=model, eval_prompts=rows.num_rows)
    metrics["seconds"] = time.perf_counter() - t0
    part = write_json_part(fs, stage, "metrics.json", metrics)
    commit_manifest(fs, stage, Manifest(stage="offline-evaluation", config_hash=ctx.config_hash, parts=[part],
                                        inputs={"checkpoint": metrics.get("checkpoint")}))
    return StageResult(stage="offline-evaluation", iteration=OFFLINE_ITERATION, rows=metrics.get("eval_prompts", 0),
                       seconds=metrics["seconds"], metrics=metrics)
