"""One line per iteration for metrics.jsonl and the Prefect artifact: stage timings, train loss and
KL per teacher, rewards, per-domain accuracy. Read from the stages' own files, so it can be rebuilt."""
from __future__ import annotations

import posixpath

from opd_tasks.context import RunContext
from opd_tasks.stages import StageResult
from storage.fs import append_jsonl, exists, read_json, read_jsonl


def _stage_json(ctx: RunContext, iteration: int, stage: str) -> dict:
    path = posixpath.join(ctx.stage_dir(iteration, stage), "metrics.json")
    return read_json(ctx.layout.fs, path) if exists(ctx.layout.fs, path) else {}


def train_means(train: dict) -> dict:
    """Token-weighted means of the first epoch's steps: every step of an epoch sees different rows
    and the same old_t, so this is the iteration's data seen by the rollout student."""
    steps = [s for s in train.get("steps", []) if s.get("epoch", 0) == 0]
    if not steps:
        return {}
    w = [s.get("tokens", 1.0) for s in steps]
    keys = {k for s in steps for k, v in s.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
    return {k: sum(s.get(k, 0.0) * wi for s, wi in zip(steps, w)) / sum(w) for k in keys}


def teacher_kl(ctx: RunContext, iteration: int) -> dict[str, float]:
    """Per teacher, the mean per-token k1 estimate of KL(rollout student || teacher) on the samples
    of the teacher's own domain (all samples when it has none), from the scored shard."""
    import numpy as np
    import pyarrow.compute as pc

    from opd_tasks.inspect import kl_estimates
    from storage.shards import TEACHER_PREFIX, flat_logp, read_stage
    names = [t.name for t in ctx.cfg.teachers]
    cols = ["domain", "behaviour_logp", *(TEACHER_PREFIX + n for n in names)]
    table = read_stage(ctx.layout.fs, ctx.stage_dir(iteration, "scored"), columns=cols)
    out = {}
    for t in ctx.cfg.teachers:
        sel = table.filter(pc.equal(table.column("domain"), t.domain)) if t.domain else table
        b = pc.list_flatten(sel.column("behaviour_logp")).to_numpy(zero_copy_only=False)
        lens = pc.list_value_length(sel.column("behaviour_logp")).to_numpy(zero_copy_only=False)
        tl = flat_logp(sel.column(TEACHER_PREFIX + t.name), lens)  # routed: scored on this domain
        out[t.name] = kl_estimates(np.asarray(b, np.float64), np.asarray(tl, np.float64))[0] if len(b) else None
    return out


def iteration_summary(ctx: RunContext, iteration: int, stages: dict[str, StageResult]) -> dict:
    t = train_means(_stage_json(ctx, iteration, "train"))
    ev = _stage_json(ctx, iteration, "eval")
    return {"iteration": iteration,
            "loss": t.get("loss"), "reward_mean": t.get("reward_mean"),
            "kl": teacher_kl(ctx, iteration),
            "kl_combined": t.get("kl_k1"),
            "accuracy": ev.get("accuracy"),
            "seconds": {k: round(s.seconds, 3) for k, s in stages.items() if not s.skipped},
            "tokens_per_s": {k: round(s.tokens_per_s, 1) for k, s in stages.items() if not s.skipped and s.tokens}}


def recorded_iterations(ctx: RunContext) -> set[int]:
    return {r.get("iteration") for r in read_metrics(ctx)}


def record_iteration(ctx: RunContext, row: dict) -> bool:
    """Append the row to metrics.jsonl unless this iteration is already there (resume-safe)."""
    fs, path = ctx.layout.fs, ctx.layout.metrics_jsonl
    seen = {r.get("iteration") for r in read_jsonl(fs, path)} if exists(fs, path) else set()
    if row["iteration"] in seen:
        return False
    append_jsonl(fs, path, row)
    return True


def read_metrics(ctx: RunContext) -> list[dict]:
    fs, path = ctx.layout.fs, ctx.layout.metrics_jsonl
    return read_jsonl(fs, path) if exists(fs, path) else []
