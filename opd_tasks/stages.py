"""What a stage reports back to the flow (StageResult: small and picklable, Prefect passes it between
tasks), and the one resumable loop that writes a stage of Parquet parts.

    result = write_stage(fs, stage_dir, name="scored", kind="scored", iteration=3, config_hash=h,
                         plan=lambda: Parts(keys=[0, 1, 2], make=score_part_k, inputs={...}))

write_stage: a stage whose manifest exists is skipped (nothing is read or loaded); otherwise
`plan()` says which parts the stage has and how to make one, the parts committed by an earlier,
interrupted call are kept (storage.shards.finished_parts), temporary files a crash left are
removed, every missing part is made and committed, and the manifest is written last. Rollout,
scoring, the offline phase's import, generation and scoring, and `opd score` all go through it.

    inp = StreamedInput(layout, rollout_dir, "rollout", range(n), expect={"config_hash": h}, writing=alive)
    Parts(keys=range(n), make=lambda k: (f(inp.table(k)), prov), ..., ready=inp.check)

StreamedInput: a stage's input read part by part while another thread still writes it (streaming
scoring): part k once it is committed (storage.shards.wait_committed), and before the output's
manifest, the check that the input's manifest lists exactly the parts that were read.
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
from storage.errors import ShardError
from storage.shards import commit_parts, finished_parts, part_name, read_part, wait_committed, write_part

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
    ready: Callable[[], None] | None = None  # called before the manifest is written (StreamedInput.check)


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
    if p.ready is not None:
        p.ready()
    m = commit_parts(fs, stage, kind, done, config_hash, inputs=p.inputs, extra=p.extra)
    return StageResult(stage=name, iteration=iteration, rows=m.rows, seconds=time.perf_counter() - t0,
                       tokens=tokens, metrics=p.metrics)


class StreamedInput:
    """The input stage at `src` (a path in layout.fs) read part by part while `writing()` says another
    thread is still writing it; parts are taken only once committed, with provenance matching `expect`."""

    def __init__(self, layout, src: str, what: str, keys: Sequence[int], expect: dict, writing: Callable[[], bool]):
        self.layout, self.src, self.what, self.keys = layout, src, what, list(keys)
        self.expect, self.writing = expect, writing
        self.infos: dict = {}

    def _info(self, k: int):
        if k not in self.infos:
            info = wait_committed(self.layout.fs, self.src, k, self.expect, self.writing)
            if info is None:
                raise ShardError(f"{self.layout.url_of(self.src)}: the {self.what} stage stopped without part "
                                 f"{part_name(k)}; resume the run (opd resume) once its error is fixed")
            self.infos[k] = info
        return self.infos[k]

    def table(self, k: int) -> pa.Table:
        return read_part(self.layout.fs, self.src, self._info(k))

    def where(self, k: int) -> dict:
        """Where part k is, for errors (as scoring.stage_parts): the parts before it are read first."""
        first = sum(self._info(j).rows or 0 for j in range(k))
        return {"where": f"{self.layout.url_of(self.src)} part {part_name(k)}", "first_row": first}

    def check(self) -> None:
        """Wait for the input's manifest; it must list exactly the parts read, with the same bytes."""
        url = self.layout.url_of(self.src)
        m = wait_committed(self.layout.fs, self.src, None, None, self.writing)
        if m is None:
            raise ShardError(f"{url}: the {self.what} stage stopped before its manifest; resume the run (opd resume)")
        listed = {p.name: p.sha256 for p in m.parts}
        read = {i.name: i.sha256 for i in self.infos.values()}
        if set(listed) != {part_name(k) for k in self.keys} or any(listed[n] != sha for n, sha in read.items()):
            raise ShardError(f"{url}: its manifest lists other parts than the {len(self.keys)} streamed from it; "
                             f"delete the stages after it in this iteration and resume")
