"""`opd score`: a dataset (token ids or texts) scored by every teacher, outside the offline phase.

    score_offline(cfg, "data/responses.parquet", "runs/x")      # -> runs/x/offline/scored/
    score_offline(cfg, "data/responses.jsonl", "scored/")        # -> scored/ (a plain directory)
"""
from __future__ import annotations

from opd_tasks.config import RunConfig
from opd_tasks.models import load_tokenizer
from opd_tasks.offline.dataset import table_parts, to_rollout_table
from opd_tasks.scoring import scoring_parts, teacher_provenance
from opd_tasks.stages import Parts, StageResult, write_stage
from storage.datasets import read_table
from storage.fs import exists, filesystem
from storage.layout import RunLayout


def output_stage_dir(output: str) -> tuple[object, str]:
    """A run directory (holds run.yaml) -> RUN/offline/scored; anything else is the stage dir itself."""
    layout = RunLayout(output)
    if exists(layout.fs, layout.run_yaml):
        return layout.fs, layout.offline_dir("scored")
    fs, path = filesystem(output)
    return fs, path.rstrip("/")


def score_offline(cfg: RunConfig, input_path: str, output: str, rows_per_part: int | None = None) -> StageResult:
    """Score `input_path` with cfg's teachers (and reference when the loss needs it) into `output`."""
    fs, stage = output_stage_dir(output)
    student, with_ref = cfg.student.path, cfg.needs_reference
    ref_path = cfg.reference.path if cfg.reference else student

    def plan() -> Parts:
        tokenizer = load_tokenizer(student, cfg.student.trust_remote_code, role="student")
        table, how = to_rollout_table(read_table(input_path), tokenizer, input_path, cfg.data.chat_template,
                                      cfg.data.verifiers)
        per = rows_per_part or cfg.rollout.rows_per_part
        keys, table_of = table_parts(table, per)
        return scoring_parts(cfg, keys, table_of, student=student, with_ref=with_ref, ref_path=ref_path,
                             where_of=lambda k: {"where": f"{input_path} (rows {k * per}.. go to part-{k:05d})",
                                                 "first_row": k * per},
                             provenance=dict(iteration=None, config_hash=cfg.config_hash(), student_checkpoint=student,
                                             source=input_path, tokenization=how,
                                             reference=ref_path if with_ref else None),
                             inputs={"dataset": input_path, "teachers": teacher_provenance(cfg), **how},
                             label="offline scoring", vocab_size=len(tokenizer),
                             metrics={"output": fs.unstrip_protocol(stage) if "://" in output else stage})

    return write_stage(fs, stage, name="offline-scored", kind="scored", iteration=None,
                       config_hash=cfg.config_hash(), plan=plan)
