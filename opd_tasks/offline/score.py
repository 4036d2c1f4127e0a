"""`opd score`: a dataset (token ids or texts) scored by every teacher, outside the offline phase.

    score_offline(cfg, "data/responses.parquet", "runs/x")      # -> runs/x/offline/scored/
    score_offline(cfg, "data/responses.jsonl", "scored/")        # -> scored/ (a plain directory)
"""
from __future__ import annotations

import logging
import posixpath
import time

from opd_tasks.config import RunConfig
from opd_tasks.models import load_tokenizer
from opd_tasks.offline.dataset import to_rollout_table
from opd_tasks.scoring import check_tokenizers, get_scorers, score_table, teacher_provenance
from opd_tasks.stages import StageResult
from storage.datasets import read_table
from storage.fs import exists, filesystem
from storage.layout import RunLayout
from storage.manifest import read_manifest
from storage.shards import build_provenance, commit_parts, finished_parts, write_part

log = logging.getLogger("opd.offline")


def output_stage_dir(output: str) -> tuple[object, str]:
    """A run directory (holds run.yaml) -> RUN/offline/scored; anything else is the stage dir itself."""
    layout = RunLayout(output)
    if exists(layout.fs, layout.run_yaml):
        return layout.fs, layout.offline_dir("scored")
    fs, path = filesystem(output)
    return fs, path.rstrip("/")


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
        part = score_table(table.slice(k * per, per), scorers, cfg, with_ref, ref_path)
        tokens += sum(len(r) for r in part.column("response_ids").to_pylist())
        done[k] = write_part(fs, stage, k, part, prov, vocab_size=len(tokenizer))
        log.info("offline scoring: part %d (%d rows)", k, part.num_rows)
    m = commit_parts(fs, stage, "scored", done, cfg.config_hash(),
                     inputs={"dataset": input_path, "teachers": teacher_provenance(cfg), **how})
    return StageResult(stage="offline-scored", rows=m.rows, seconds=time.perf_counter() - t0, tokens=tokens,
                       metrics={"output": posixpath.join(fs.unstrip_protocol(stage)) if "://" in output else stage})
