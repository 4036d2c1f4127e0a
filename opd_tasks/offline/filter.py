"""The offline filter: which scored offline rows the warm start trains on, and why the others not.

    run_offline_filter(ctx)          # offline/scored -> offline/filter/decisions.json + manifest
    kept_rows(fs, scored_dir, table) # the kept rows (the trainer, iteration -1)
"""
from __future__ import annotations

import json
import math
import posixpath
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.config import OfflineFilterConfig
from opd_tasks.context import RunContext
from opd_tasks.errors import DataError, OpdError
from opd_tasks.stages import StageResult
from storage.layout import OFFLINE_ITERATION
from storage.manifest import (Manifest, commit_manifest, read_manifest, read_part_verified, remove_tmp_files,
                              write_json_part)
from storage.shards import read_stage

DECISIONS = "decisions.json"
REASONS = ("kept", "empty_response", "no_reward", "reward_below_min", "teacher_logp_below_min")



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
