"""The offline phase's score step: offline/rollout -> offline/scored (every teacher + the combination)."""
from __future__ import annotations

import logging
import time

import pyarrow.compute as pc

from opd_tasks.context import RunContext
from opd_tasks.errors import OpdError
from opd_tasks.scoring import check_tokenizers, get_scorers, score_table, teacher_provenance
from opd_tasks.stages import StageResult
from storage.layout import OFFLINE_ITERATION
from storage.manifest import read_manifest, remove_tmp_files
from storage.shards import build_provenance, commit_parts, finished_parts, part_index, read_part, write_part

log = logging.getLogger("opd.offline")


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
                                engine=cfg.scoring.engine, source=rollout.extra.get("source"))
        for k, part in todo:
            table = score_table(read_part(fs, src, part), scorers, cfg, False)
            tokens += int(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0)
            done[k] = write_part(fs, stage, k, table, prov)
            log.info("offline scoring part %s: %d samples", part.name, table.num_rows)
    m = commit_parts(fs, stage, "scored", done, ctx.config_hash,
                     inputs={"rollout": ctx.layout.url_of(src), "teachers": teacher_provenance(cfg)})
    return StageResult(stage="offline-scored", iteration=OFFLINE_ITERATION, rows=m.rows,
                       seconds=time.perf_counter() - t0, tokens=tokens)
