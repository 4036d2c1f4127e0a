"""`opd inspect --sample ID` on a shard scored with scoring.top_k: each response token's top-k
alternatives per teacher (teacher_topk_ids/logp.NAME), next to the token that was sampled."""
from __future__ import annotations

from typing import Callable

import pyarrow as pa

from storage.columns import TOPK_IDS_PREFIX, TOPK_LOGP_PREFIX


def topk_teachers(table: pa.Table) -> list[str]:
    return [c[len(TOPK_IDS_PREFIX):] for c in table.column_names if c.startswith(TOPK_IDS_PREFIX)]


def add_topk(tokens: list[dict], table: pa.Table, row: int, k: int, decode: Callable[[list[int]], str | None]) -> None:
    """tokens[p]["topk"] = {teacher: [{"token_id", "token", "logp"}, ...] largest first} for row `row`
    (teachers that did not score the row, under routed scoring, are left out)."""
    for name in topk_teachers(table):
        ids = table.column(TOPK_IDS_PREFIX + name)[row].as_py()
        lps = table.column(TOPK_LOGP_PREFIX + name)[row].as_py()
        if ids is None or lps is None:
            continue
        for p, tok in enumerate(tokens):
            alts = [{"token_id": i, "token": decode([i]), "logp": round(lp, 6)}
                    for i, lp in zip(ids[p * k:(p + 1) * k], lps[p * k:(p + 1) * k])]
            tok.setdefault("topk", {})[name] = alts


def render_topk(con, sample: dict) -> None:
    """One table: per position and teacher, the alternatives ('*' marks the sampled token)."""
    from rich.table import Table

    if not sample["tokens"] or not sample["tokens"][0].get("topk"):
        return
    tab = Table(title=f"top-k alternatives of each teacher (sample {sample['sample_id']}; * = the sampled token)")
    for c in ("pos", "token", "teacher", "alternatives (log-prob)"):
        tab.add_column(c)
    for t in sample["tokens"]:
        for name, alts in t["topk"].items():
            cells = [f"{'*' if a['token_id'] == t['token_id'] else ''}"
                     f"{repr(a['token']) if a['token'] is not None else '#' + str(a['token_id'])} {a['logp']:.3f}"
                     for a in alts]
            tab.add_row(str(t["position"]), repr(t["token"]) if t["token"] is not None else f"#{t['token_id']}",
                        name, "  ".join(cells))
    con.print(tab)
