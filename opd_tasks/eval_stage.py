"""The evaluation stage of a run: greedy per-domain accuracy of each iteration's new student.

    run_evaluation(ctx, iteration)   # -> RUN/iter-N/eval/metrics.json + _MANIFEST.json
    read_baseline(ctx)               # initial student and teachers, once per run: RUN/baseline.json

Evaluated every `eval.every` iterations and always at the last one; an unscheduled iteration
still gets a manifest (metrics say scheduled: false), so "eval done" means the iteration is done.
"""
from __future__ import annotations

from opd_tasks.errors import OpdError
from opd_tasks.evaluate import greedy_accuracy
from storage.faults import fault_point

def eval_prompts(ctx):
    """The eval split (data.eval, else data.train), first eval.max_prompts rows: the same rows for
    every model and iteration, so accuracies are comparable."""
    from storage.datasets import read_prompts
    cfg = ctx.cfg
    table = read_prompts(cfg.data.eval or cfg.data.train, need=("answer",))
    return table.slice(0, cfg.eval.max_prompts) if cfg.eval.max_prompts else table


def is_scheduled(ctx, iteration: int) -> bool:
    every, last = ctx.cfg.eval.every, ctx.cfg.iterations - 1
    return every > 0 and ((iteration + 1) % every == 0 or iteration == last)


def _accuracy(ctx, model_path: str, rows) -> dict[str, float]:
    e = ctx.cfg.eval
    return greedy_accuracy(model_path, rows, max_new_tokens=e.max_new_tokens, token_budget=e.token_budget)


def read_baseline(ctx) -> dict:
    """Accuracy of the initial student and of every teacher on the eval split, computed once per
    run and kept in RUN/baseline.json."""
    from storage.fs import exists, read_json, write_json_atomic
    fs, path = ctx.layout.fs, ctx.layout.join("baseline.json")
    if exists(fs, path):
        return read_json(fs, path)
    rows = eval_prompts(ctx)
    base = {"student": _accuracy(ctx, ctx.cfg.student.path, rows),
            "teachers": {t.name: _accuracy(ctx, t.path, rows) for t in ctx.cfg.teachers},
            "eval_prompts": rows.num_rows}
    write_json_atomic(fs, path, base)
    return base


def run_evaluation(ctx, iteration: int):
    """Greedy per-domain accuracy of the checkpoint after training `iteration` (when scheduled by
    eval.every; the last iteration is always evaluated), written to iter-N/eval/metrics.json."""
    import time
    from opd_tasks.stages import StageResult
    from storage.checkpoints import hf_dir, is_complete
    from storage.manifest import Manifest, commit_manifest, read_manifest, remove_tmp_files, write_json_part
    fs, stage = ctx.layout.fs, ctx.stage_dir(iteration, "eval")
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="eval", iteration=iteration, skipped=True)
    remove_tmp_files(fs, stage)  # left by a write that a crash interrupted
    t0 = time.perf_counter()
    metrics: dict = {"iteration": iteration, "scheduled": is_scheduled(ctx, iteration)}
    if metrics["scheduled"]:
        if not is_complete(ctx.layout, iteration):
            raise OpdError(f"{ctx.run_dir}: checkpoint of iteration {iteration} is not complete; "
                           f"train it first (opd resume)")
        from opd_tasks.engines.lifecycle import release_for_stage
        release_for_stage(ctx.cfg, "eval")
        read_baseline(ctx)  # once per run, before the first evaluation
        model = ctx.layout.url_of(hf_dir(ctx.layout, iteration))
        rows = eval_prompts(ctx)
        metrics.update(accuracy=_accuracy(ctx, model, rows), checkpoint=model, eval_prompts=rows.num_rows)
    metrics["seconds"] = time.perf_counter() - t0
    fault_point("eval")
    part = write_json_part(fs, stage, "metrics.json", metrics)
    commit_manifest(fs, stage, Manifest(stage="eval", config_hash=ctx.config_hash, parts=[part],
                                        inputs={"checkpoint": metrics.get("checkpoint")}))
    return StageResult(stage="eval", iteration=iteration, rows=metrics.get("eval_prompts", 0),
                       seconds=metrics["seconds"], metrics=metrics)
