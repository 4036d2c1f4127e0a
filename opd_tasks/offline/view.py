"""The offline filter in `opd inspect --offline`: what it kept and dropped, and examples of each reason."""
from __future__ import annotations

from typing import Callable

import pyarrow as pa

from opd_tasks.offline.filter import read_decisions
from storage.manifest import read_manifest


def filter_report(fs, filter_dir: str, table: pa.Table, top: int,
                  decode: Callable[[list[int]], str | None]) -> dict | None:
    """What the offline filter kept and dropped: counts by reason and by domain, the thresholds, and
    up to `top` examples per reason (None when the filter has not run)."""
    m = read_manifest(fs, filter_dir)
    if m is None:
        return None
    d = read_decisions(fs, filter_dir)
    row_of = {sid: i for i, sid in enumerate(table.column("sample_id").to_pylist())}
    examples: dict[str, list] = {}
    for j, why in enumerate(d["reason"]):
        if len(examples.setdefault(why, [])) >= top:
            continue
        i = row_of.get(d["sample_id"][j])
        ids = table.column("response_ids")[i].as_py() if i is not None else []
        examples[why].append({"sample_id": d["sample_id"][j], "domain": d["domain"][j], "reward": d["reward"][j],
                              "teacher_logp_per_token": d["teacher_logp_per_token"][j],
                              "response_len": d["response_len"][j], "response": decode(ids), "response_ids": ids})
    return {"filter_dir": filter_dir, **{k: m.extra.get(k) for k in ("rows", "kept", "dropped", "reasons",
                                                                     "by_domain", "filter")},
            "examples": examples}
