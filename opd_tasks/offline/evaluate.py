"""The offline phase's evaluation: greedy accuracy of the warm-started student."""
from __future__ import annotations

from opd_tasks.context import RunContext
from opd_tasks.eval_stage import evaluate_stage
from opd_tasks.stages import StageResult
from storage.layout import OFFLINE_ITERATION


def run_offline_evaluation(ctx: RunContext) -> StageResult:
    """Greedy per-domain accuracy of the warm-started student (checkpoints/offline/hf) on the eval
    split, when evaluation is on (eval.every > 0) -> offline/evaluation/metrics.json + manifest."""
    from storage.checkpoints import warm_start_dir
    return evaluate_stage(ctx, ctx.offline_dir("evaluation"), name="offline-evaluation", iteration=OFFLINE_ITERATION,
                          scheduled=ctx.cfg.eval.every > 0, model=lambda: ctx.layout.url_of(warm_start_dir(ctx.layout)))
