"""The offline phase's evaluation: greedy accuracy of the warm-started student."""
from __future__ import annotations

import time

from opd_tasks.context import RunContext
from opd_tasks.stages import StageResult
from storage.layout import OFFLINE_ITERATION
from storage.manifest import Manifest, commit_manifest, read_manifest, remove_tmp_files, write_json_part


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
