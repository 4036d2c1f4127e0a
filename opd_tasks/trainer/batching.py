"""Scored rows -> mini-batches -> token-budget micro-batches, identically on every rank.

Every rank holds all rows of the iteration (a few MB of ids and log-probs), so every rank
computes the same plan without communication: the epoch's shuffle, the mini-batch split,
the normalizer (global valid-token count) and which micro-batches each rank runs. Ranks that
run out of rows run zero-weight "dummy" micro-batches so that all ranks make the same number
of forward/backward calls (FSDP collectives must match).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from opd_tasks.packing import pack
from opd_tasks.trainer import TrainError
from storage.columns import TEACHER_PREFIX, flat_logp

TOPK_IDS, TOPK_LOGP = "teacher_topk_ids.", "teacher_topk_logp."  # = storage.columns' prefixes


@dataclass
class Rows:
    """All samples of one iteration. Row i is prompt_ids[i] + response_ids[i].

    input_ids[i]: [L_i] int64; start: [N] index of response token 0 (= prompt length);
    response_len: [N]; token[name][i]: [R_i] float32 for behaviour_logp, teacher_logp, ref_logp,
    teacher_logp.NAME and (after the recompute) old_logp; rewards/advantages: [N] float32.
    """
    input_ids: list[torch.Tensor]
    start: torch.Tensor
    response_len: torch.Tensor
    token: dict[str, list[torch.Tensor]]
    rewards: torch.Tensor
    prompt_ids: list[str]
    advantages: torch.Tensor | None = None
    teachers: list[str] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)  # the scored stage's (Parquet metadata), {} if none
    top_k: int = 0  # loss.kind=topk: K, and per teacher taking part ids/logp [R_i * K] and row weights [N]
    topk_ids: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    topk_logp: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    topk_weight: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> torch.Tensor:
        """[N] prompt + response length of each row."""
        return self.start + self.response_len


def _lists(table: pa.Table, name: str, source: str, dtype,
           lengths: np.ndarray | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """A list<...> column as per-row numpy views and row lengths [N]. With `lengths` (the response
    lengths), null rows are allowed and become NaN rows of that length (a teacher that did not score
    a routed sample)."""
    col = table.column(name).combine_chunks()
    if col.null_count and lengths is not None:
        vals = flat_logp(col, lengths).astype(dtype)
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        return [vals[a:b] for a, b in zip(offsets[:-1], offsets[1:])], lengths.copy()
    if col.null_count:
        raise TrainError(f"{source}: column {name!r} has {col.null_count} null rows; re-run the stage "
                         f"that wrote it (every row needs a list)")
    offsets = np.asarray(col.offsets, dtype=np.int64)
    offsets = offsets - offsets[0]
    values = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # a writable copy
    return [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])], np.diff(offsets)


def rows_from_table(table: pa.Table, source: str, *, need_ref: bool = False, need_reward: bool = False,
                    need_behaviour: bool = True, topk_weights: dict[str, np.ndarray] | None = None) -> Rows:
    """Build Rows from a scored table; errors name `source` (the scored dir), the column and the fix.

    behaviour_logp may be null in every row (offline data) when need_behaviour is False (no TIS).
    topk_weights (loss.kind=topk): per teacher its [N] row weights (combine.topk_row_weights); the
    top-k columns of the teachers with any weight > 0 are read, K from the provenance's top_k.
    """
    if table.num_rows == 0:
        raise TrainError(f"{source}: the scored stage has no rows; nothing to train on "
                         f"(check the rollout and scoring stages of this iteration)")
    required = ["prompt_id", "prompt_ids", "response_ids", "teacher_logp"]
    required += ["behaviour_logp"] if need_behaviour else []
    required += ["ref_logp"] if need_ref else []
    required += ["reward"] if need_reward else []
    missing = [c for c in required if c not in table.column_names]
    if missing:
        why = {"ref_logp": " (loss.kind=gopd with lambda != 1 needs reference scores)",
               "reward": " (loss.kind=kdrl needs verifier rewards)"}
        raise TrainError(f"{source}: scored shards lack column(s) {missing}"
                         f"{''.join(why.get(c, '') for c in missing)}; re-run scoring for this iteration")
    prompts, plen = _lists(table, "prompt_ids", source, np.int64)
    responses, rlen = _lists(table, "response_ids", source, np.int64)
    if (plen == 0).any():
        raise TrainError(f"{source}: column 'prompt_ids' has {(plen == 0).sum()} empty rows; "
                         f"a response needs at least one prompt token before it")
    if rlen.sum() == 0:
        raise TrainError(f"{source}: all {len(rlen)} responses are empty (0 response tokens); nothing to train on. "
                         f"The generator returned no tokens: check the student's EOS and the engine's stop "
                         f"settings, then delete this iteration's rollout/ and scored/ directories and resume")
    teachers = sorted(c[len(TEACHER_PREFIX):] for c in table.column_names if c.startswith(TEACHER_PREFIX))
    names = ["teacher_logp"] + (["ref_logp"] if need_ref else []) + [TEACHER_PREFIX + t for t in teachers]
    if "behaviour_logp" in table.column_names:
        nulls = table.column("behaviour_logp").null_count
        if nulls and need_behaviour:
            raise TrainError(f"{source}: column 'behaviour_logp' is null in {nulls} rows (offline data?); "
                             f"truncated importance sampling needs it: set loss.tis_cap: null to train without")
        if nulls < table.num_rows:
            names.insert(0, "behaviour_logp")
    token: dict[str, list[torch.Tensor]] = {}
    for name in names:
        vals, n = _lists(table, name, source, np.float32, rlen if name.startswith(TEACHER_PREFIX) else None)
        bad = np.flatnonzero(n != rlen)
        if len(bad):
            sid = table.column("sample_id")[int(bad[0])].as_py() if "sample_id" in table.column_names else None
            raise TrainError(f"{source}: column {name!r} row {int(bad[0])} (sample_id {sid!r}, counting the "
                             f"stage's parts in order) has {int(n[bad[0]])} values for "
                             f"{int(rlen[bad[0]])} response tokens ({len(bad)} rows differ); log-probs must be "
                             f"in response-token indexing; re-run the stage that wrote {name!r}")
        token[name] = [torch.from_numpy(v) for v in vals]
    rewards = torch.full((table.num_rows,), float("nan"))
    if "reward" in table.column_names:
        r = table.column("reward").combine_chunks()
        if need_reward and r.null_count:
            raise TrainError(f"{source}: column 'reward' has {r.null_count} null rows; loss.kind=kdrl needs a "
                             f"verifier reward for every sample (check data.train's answers/domains)")
        rewards = torch.from_numpy(np.asarray(r.to_numpy(zero_copy_only=False), dtype=np.float32).copy())
    rows = Rows(
        input_ids=[torch.from_numpy(np.concatenate([p, r])) for p, r in zip(prompts, responses)],
        start=torch.from_numpy(plen.copy()), response_len=torch.from_numpy(rlen.copy()),
        token=token, rewards=rewards, prompt_ids=[str(p) for p in table.column("prompt_id").to_pylist()],
        teachers=teachers, provenance=_provenance(table))
    if topk_weights is not None:
        _read_topk(rows, table, source, topk_weights, rlen)
    return rows


def _read_topk(rows: Rows, table: pa.Table, source: str, weights: dict[str, np.ndarray], rlen: np.ndarray) -> None:
    k = rows.provenance.get("top_k") or 0
    names = [n for n, w in sorted(weights.items()) if (np.asarray(w) > 0).any()]
    missing = [p + n for n in names for p in (TOPK_IDS, TOPK_LOGP) if p + n not in table.column_names]
    if not k or missing:
        raise TrainError(f"{source}: loss.kind=topk needs the teachers' top-k, but the scored shards have "
                         f"{'no top_k in their provenance' if not k else f'no column(s) {missing}'}; set scoring.top_k: K "
                         f"(> 0) and re-score (delete this scored directory, then opd resume)")
    rows.top_k = k
    for n in names:
        w = np.asarray(weights[n], dtype=np.float32)
        ids, lp = (_topk_rows(table, c + n, source, dt, rlen, k, w) for c, dt in ((TOPK_IDS, np.int64),
                                                                               (TOPK_LOGP, np.float32)))
        rows.topk_ids[n] = [torch.from_numpy(v.reshape(-1, k)) for v in ids]
        rows.topk_logp[n] = [torch.from_numpy(v.reshape(-1, k)) for v in lp]
        rows.topk_weight[n] = torch.from_numpy(w)


def _topk_rows(table: pa.Table, name: str, source: str, dtype, rlen: np.ndarray, k: int,
               w: np.ndarray) -> list[np.ndarray]:
    """Per-row values [R_i * K] of a top-k column. A row the teacher did not score (null: routed
    scoring) is allowed where its weight is 0, and reads as ids 0..K-1 with log-probs -log(K + 1)
    at every position (a valid placeholder that the weight-0 term multiplies by 0)."""
    col = table.column(name).combine_chunks()
    null = col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.zeros(len(col), bool)
    if (null & (w > 0)).any():
        r = int(np.flatnonzero(null & (w > 0))[0])
        raise TrainError(f"{source}: column {name!r} is null for row {r}, which this teacher teaches; re-score "
                         f"with scoring.top_k (and scoring.teachers: all for a mixture)")
    vals = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=dtype)  # null rows hold no values
    have = np.where(null, 0, pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64))
    if (have[~null] != rlen[~null] * k).any() or have.sum() != len(vals):
        raise TrainError(f"{source}: column {name!r} does not hold top_k={k} values per response token; re-run "
                         f"scoring for this iteration")
    fill = np.arange(k, dtype=dtype) if np.issubdtype(dtype, np.integer) else np.full(k, -np.log(k + 1), dtype)
    out, at = [], 0
    for i, n in enumerate(rlen * k):
        if null[i]:
            out.append(np.tile(fill, int(rlen[i])))
        else:
            out.append(vals[at:at + n])
            at += n
    return out


def _provenance(table: pa.Table) -> dict:
    raw = (table.schema.metadata or {}).get(b"opd")  # storage.shards.PROVENANCE_KEY
    try:
        prov = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return prov if isinstance(prov, dict) else {}


def group_ids(prompt_ids: list[str]) -> torch.Tensor:
    """[N] int64 group index per row: rows with the same prompt_id share one (first-seen order)."""
    index: dict[str, int] = {}
    return torch.tensor([index.setdefault(p, len(index)) for p in prompt_ids], dtype=torch.long)


def shuffle_seed(seed: int, iteration: int, epoch: int) -> int:
    """A 63-bit seed that depends on (seed, iteration, epoch) only (stable across processes)."""
    digest = hashlib.sha256(f"opd-train/{seed}/{iteration}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mini_batches(n: int, num: int, seed: int, iteration: int, epoch: int) -> list[torch.Tensor]:
    """Shuffle 0..n-1 for this epoch and split into `num` chunks (sizes differ by at most 1).

    Returns a list of [n_k] int64 row-index tensors; chunks are never empty (num is capped at n).
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed(seed, iteration, epoch)))
    return list(torch.tensor_split(order, min(num, n)))


def rank_plan(indices: torch.Tensor, lengths: torch.Tensor, token_budget: int,
              rank: int, world: int) -> list[list[int] | None]:
    """The micro-batches rank `rank` runs for one mini-batch: row-index lists, None = dummy.

    Rows are dealt round-robin by length (balanced tokens per rank), each rank packs its own rows,
    and every rank's list is padded with None to the longest rank's count.
    """
    by_len = sorted(indices.tolist(), key=lambda i: (-int(lengths[i]), i))
    per_rank = [pack(by_len[r::world], lengths, token_budget) for r in range(world)]
    count = max(len(p) for p in per_rank)
    mine = per_rank[rank]
    return mine + [None] * (count - len(mine))


def collate(rows: Rows, idx: list[int], token_names: Iterable[str] | None = None, pad_id: int = 0) -> dict:
    """One micro-batch as tensors, right-padded (pad_id is never attended to: attention_mask 0).

    Returns input_ids/attention_mask [B, L]; start, response_len [B]; mask [B, R] bool; for every
    per-token column NAME in `token_names` (default: all of rows.token): NAME [B, R] float32
    (0 on padding); rewards [B] and advantages [B] when present; with top-k rows, per teacher
    teacher_topk_ids.NAME [B, R, K] int64, teacher_topk_logp.NAME [B, R, K], topk_weight.NAME [B].
    """
    L = int(rows.lengths[idx].max())
    R = int(rows.response_len[idx].max())
    B = len(idx)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    att = torch.zeros((B, L), dtype=torch.long)
    names = list(rows.token) if token_names is None else list(token_names)
    out = {name: torch.zeros((B, R)) for name in names}
    for b, i in enumerate(idx):
        n = len(rows.input_ids[i])
        ids[b, :n] = rows.input_ids[i]
        att[b, :n] = 1
        r = int(rows.response_len[i])
        for name in names:
            out[name][b, :r] = rows.token[name][i]
    for n in rows.topk_ids:  # [B, R, K]; padding: id 0 and log-prob 0 (the loss reads only masked-in tokens)
        t_ids, t_lp = torch.zeros((B, R, rows.top_k), dtype=torch.long), torch.zeros((B, R, rows.top_k))
        for b, i in enumerate(idx):
            r = int(rows.response_len[i])
            t_ids[b, :r], t_lp[b, :r] = rows.topk_ids[n][i], rows.topk_logp[n][i]
        out[TOPK_IDS + n], out[TOPK_LOGP + n] = t_ids, t_lp
        out["topk_weight." + n] = rows.topk_weight[n][torch.tensor(idx, dtype=torch.long)]
    sel = torch.tensor(idx, dtype=torch.long)
    out.update(input_ids=ids, attention_mask=att, start=rows.start[sel], response_len=rows.response_len[sel],
               mask=torch.arange(R).unsqueeze(0) < rows.response_len[sel].unsqueeze(1), rewards=rows.rewards[sel])
    if rows.advantages is not None:
        out["advantages"] = rows.advantages[sel]
    return out
