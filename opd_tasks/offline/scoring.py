"""The offline phase's score step: offline/rollout -> offline/scored (every teacher + the combination)."""
from __future__ import annotations

from opd_tasks.context import RunContext
from opd_tasks.scoring import scoring_parts, stage_parts, teacher_provenance
from opd_tasks.stages import Parts, StageResult, write_stage
from storage.layout import OFFLINE_ITERATION
from storage.manifest import read_manifest


def run_offline_scoring(ctx: RunContext) -> StageResult:
    """offline/rollout -> offline/scored: every teacher's log-probs and the combination, part by part
    (a resumed stage scores only the missing parts). No reference: the sft loss does not read it."""
    cfg, student = ctx.cfg, ctx.cfg.student.path
    src, stage = ctx.offline_dir("rollout"), ctx.offline_dir("scored")

    def plan() -> Parts:
        keys, table_of, where_of = stage_parts(ctx.layout, src, "offline rollout")
        source = read_manifest(ctx.layout.fs, src).extra.get("source")
        return scoring_parts(cfg, keys, table_of, student=student, with_ref=False, ref_path=student, where_of=where_of,
                             provenance=dict(iteration=OFFLINE_ITERATION, config_hash=ctx.config_hash,
                                             student_checkpoint=None, engine=cfg.scoring.engine, source=source),
                             inputs={"rollout": ctx.layout.url_of(src), "teachers": teacher_provenance(cfg)},
                             label="offline scoring")

    return write_stage(ctx.layout.fs, stage, name="offline-scored", kind="scored", iteration=OFFLINE_ITERATION,
                       config_hash=ctx.config_hash, plan=plan)
