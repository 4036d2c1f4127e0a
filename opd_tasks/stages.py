"""What a stage reports back to the flow (StageResult: small and picklable, Prefect passes it between
tasks), and the one resumable loop that writes a stage of Parquet parts.

    result = write_stage(fs, stage_dir, name="scored", kind="scored", iteration=3, config_hash=h,
                         plan=lambda: Parts(keys=[0, 1, 2], make=score_part_k, inputs={...}))

write_stage: a stage whose manifest exists is skipped (nothing is read or loaded); otherwise
`plan()` says which parts the stage has and how to make one, the parts committed by an earlier,
interrupted call are kept (storage.shards.finished_parts), temporary files a crash left are
removed, every missing part is made and committed, and the manifest is written last. Rollout,
scoring, the offline phase's import, generation and scoring, and `opd score` all go through it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from storage.faults import fault_point
from storage.manifest import read_manifest, remove_tmp_files
from storage.shards import commit_parts, finished_parts, write_part

log = logging.getLogger("opd.stages")


class StageResult(BaseModel):
    stage: str
    iteration: int | None = None
    rows: int = 0
    seconds: float = 0.0
    skipped: bool = False          # the stage's manifest already existed: nothing was redone
    tokens: int = 0                # response tokens produced/consumed by this call
    metrics: dict = Field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Parts:
    """A stage's parts: make(k) -> (table, provenance) of part k, called only for the parts of `keys`
    not committed yet, in order. The manifest gets `inputs` and `extra`."""
    keys: Sequence[int]
    make: Callable[[int], tuple[pa.Table, dict]]
    inputs: dict
    extra: dict | None = None
    vocab_size: int | None = None   # check token ids against it (ids that were not read from a stage)
    fault: str | None = None        # storage.faults point after each committed part (crash tests)
    label: str = "stage"            # log lines: "LABEL part k/n: rows"
    metrics: dict = field(default_factory=dict)  # the StageResult's metrics


def response_tokens(table: pa.Table) -> int:
    return int(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py() or 0)


def write_stage(fs, stage: str, *, name: str, kind: str, iteration: int | None, config_hash: str,
                plan: Callable[[], Parts]) -> StageResult:
    """Write the stage at `stage` (a path in fs) part by part; see the module docstring."""
    t0 = time.perf_counter()
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage=name, iteration=iteration, rows=m.rows, skipped=True)
    p = plan()
    done = finished_parts(fs, stage, expect={"config_hash": config_hash})
    remove_tmp_files(fs, stage)  # left by a write that a crash interrupted
    tokens = 0
    for n, k in enumerate(p.keys):
        if k in done:
            continue
        table, provenance = p.make(k)
        tokens += response_tokens(table)
        done[k] = write_part(fs, stage, k, table, provenance, vocab_size=p.vocab_size)
        if p.fault:
            fault_point(p.fault)
        log.info("%s part %d/%d: %d rows", p.label, n + 1, len(p.keys), table.num_rows)
    m = commit_parts(fs, stage, kind, done, config_hash, inputs=p.inputs, extra=p.extra)
    return StageResult(stage=name, iteration=iteration, rows=m.rows, seconds=time.perf_counter() - t0,
                       tokens=tokens, metrics=p.metrics)
