"""Shard schemas, fast column builders and per-row validation (re-exported by storage.shards).

Rollout shard, one row per sampled response:
    sample_id string, prompt_id string, group_index int32, domain string (null ok),
    prompt_ids list<int32>, response_ids list<int32>,
    behaviour_logp list<float32> (one per response token; a null list = not recorded, e.g. offline data),
    finish_reason string, reward float32 (null ok), iteration int32
Scored shard: the rollout columns + teacher_logp.NAME per teacher, teacher_logp (combined), and
ref_logp (optional). Every log-prob list is in response-token indexing: element j is
log p(response_ids[j] | prompt_ids + response_ids[:j]), so its length is len(response_ids).
With scoring.top_k = K (provenance "top_k"), per teacher also teacher_topk_ids.NAME list<int32>
and teacher_topk_logp.NAME list<float32>, K values per response token, row-major [R, K]:
elements j*K .. j*K+K-1 are the teacher's K most likely tokens at the position that predicts
response token j and their log-probs, largest first (ties: smaller id first).

    flat, offsets = pack([np.array([1, 2]), np.array([3])], np.int32)   # -> [1 2 3], [0 2 3]
    t = rollout_table({"sample_id": ids, ..., "response_ids": (flat, offsets), "iteration": 3})
    s = scored_table(t, {"math": logps_math, "code": logps_code}, combined=logps_mix)
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.errors import ShardError

TEACHER_PREFIX = "teacher_logp."
TOPK_IDS_PREFIX, TOPK_LOGP_PREFIX = "teacher_topk_ids.", "teacher_topk_logp."
TEACHER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LOGP_TOLERANCE = 1e-3  # a log-prob above this is not a log-prob (probabilities or logits stored?)
LIST_COLUMNS_INT = ("prompt_ids", "response_ids")

_ROLLOUT_FIELDS = (
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("group_index", pa.int32(), nullable=False),
    pa.field("domain", pa.string(), nullable=True),
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("behaviour_logp", pa.list_(pa.float32()), nullable=True),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("reward", pa.float32(), nullable=True),
    pa.field("iteration", pa.int32(), nullable=False),
)
_LOGP = pa.list_(pa.float32())


def rollout_schema() -> pa.Schema:
    return pa.schema(_ROLLOUT_FIELDS)


def check_teacher_names(names: Iterable[str]) -> list[str]:
    names = list(names)
    for n in names:
        if not isinstance(n, str) or not TEACHER_NAME_RE.match(n):
            raise ShardError(f"teacher name {n!r} is not allowed as a column suffix: use 1-64 letters, digits, "
                             f"'_' or '-' (teachers[].name in the config)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ShardError(f"teacher names repeated: {dup}; every teacher needs its own name")
    return names


def _topk_fields(names: Sequence[str]) -> list[pa.Field]:
    # null on the samples the teacher did not score, like its teacher_logp.NAME (scoring.teachers: routed)
    return [f for n in names for f in (pa.field(TOPK_IDS_PREFIX + n, pa.list_(pa.int32()), nullable=True),
                                       pa.field(TOPK_LOGP_PREFIX + n, _LOGP, nullable=True))]


def scored_schema(teacher_names: Sequence[str], with_ref: bool = False, top_k: int = 0) -> pa.Schema:
    names = check_teacher_names(teacher_names)
    # a teacher's column is null on the samples it did not score (scoring.teachers: routed)
    fields = list(_ROLLOUT_FIELDS) + [pa.field(TEACHER_PREFIX + n, _LOGP, nullable=True) for n in names]
    fields.append(pa.field("teacher_logp", _LOGP, nullable=False))
    if with_ref:
        fields.append(pa.field("ref_logp", _LOGP, nullable=False))
    return pa.schema(fields + (_topk_fields(names) if top_k else []))


def teacher_columns(names: Iterable[str]) -> list[str]:
    """The teacher_logp.NAME columns of a schema or table's column names, in order (names only)."""
    return [c[len(TEACHER_PREFIX):] for c in names if c.startswith(TEACHER_PREFIX)]


# ---- builders: offsets + flat arrays, never Python lists of lists ----------------------------------

def _as_pa_type(dtype: Any) -> pa.DataType:
    if isinstance(dtype, pa.DataType):
        return dtype
    return pa.from_numpy_dtype(np.dtype(dtype))


def list_array(flat: np.ndarray, offsets: np.ndarray, dtype: Any, mask: np.ndarray | None = None) -> pa.ListArray:
    """list<dtype> column from values [N] and offsets [rows+1] (row i = flat[offsets[i]:offsets[i+1]]).
    mask [rows] bool marks null rows. Integer values are range-checked before narrowing."""
    typ = _as_pa_type(dtype)
    flat = np.asarray(flat)
    offsets = np.asarray(offsets)
    if flat.ndim != 1 or offsets.ndim != 1 or len(offsets) == 0:
        raise ShardError(f"list column: need 1-d values and 1-d offsets of length rows+1, got shapes "
                         f"{flat.shape} and {offsets.shape}")
    if offsets[0] != 0 or offsets[-1] != len(flat) or (len(offsets) > 1 and np.any(np.diff(offsets) < 0)):
        raise ShardError(f"list column: offsets must start at 0, never decrease and end at len(values)="
                         f"{len(flat)}; got first={offsets[0]}, last={offsets[-1]}")
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ShardError(f"list column: {offsets[-1]} values do not fit one part; write fewer rows per part")
    np_type = typ.to_pandas_dtype()
    if pa.types.is_integer(typ) and flat.size and np.issubdtype(flat.dtype, np.integer):
        info = np.iinfo(np_type)
        lo, hi = flat.min(), flat.max()
        if lo < info.min or hi > info.max:
            raise ShardError(f"list column: values {lo}..{hi} do not fit {typ}")
    values = pa.array(flat.astype(np_type, copy=False), type=typ)
    m = None if mask is None else pa.array(np.asarray(mask, dtype=bool))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32, copy=False), pa.int32()), values, mask=m)


def pack(arrays: Sequence[Any], dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Per-row arrays -> (flat values [N], offsets [rows+1] int64). None rows become empty."""
    np_type = _as_pa_type(dtype).to_pandas_dtype()
    lengths = np.fromiter((0 if a is None else len(a) for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    parts = [np.asarray(a) for a in arrays if a is not None and len(a)]
    flat = np.concatenate(parts).astype(np_type, copy=False) if parts else np.zeros(0, np_type)
    return flat, offsets


def flat_logp(col: pa.Array | pa.ChunkedArray, lengths: np.ndarray) -> np.ndarray:
    """A log-prob list column as flat float32 [sum(lengths)] aligned with the response tokens
    (lengths [rows]: len(response_ids) per row); a null row (a teacher that did not score it) is NaN."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    valid = np.repeat(~pc.is_null(col).to_numpy(zero_copy_only=False), lengths)
    vals = pc.list_flatten(col).to_numpy(zero_copy_only=False).astype(np.float32)
    if valid.all():
        return vals
    out = np.full(valid.shape, np.nan, np.float32)
    out[valid] = vals
    return out


def list_column(values: Any, dtype: Any) -> pa.Array:
    """A list column from (flat, offsets), a pyarrow array, or a sequence of per-row arrays (None = null)."""
    typ = pa.list_(_as_pa_type(dtype))
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if values.type == typ else values.cast(typ)
    if isinstance(values, tuple) and len(values) == 2 and isinstance(values[1], np.ndarray):
        return list_array(values[0], values[1], dtype)
    mask = np.fromiter((v is None for v in values), dtype=bool, count=len(values))
    flat, offsets = pack(values, dtype)
    return list_array(flat, offsets, dtype, mask=mask if mask.any() else None)


def _scalar_column(values: Any, typ: pa.DataType, n: int | None) -> pa.Array:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values if values.type == typ else values.cast(typ)
    if values is None or np.isscalar(values):
        if n is None:
            raise ShardError("cannot broadcast a scalar column without sample_id")
        return pa.array([values] * n, type=typ) if values is None else pa.array(np.full(n, values), type=typ)
    return pa.array(values, type=typ)


def rollout_table(columns: dict[str, Any]) -> pa.Table:
    """The rollout table from a dict of columns: list columns as (flat, offsets), per-row arrays or
    pyarrow arrays; scalar columns as arrays/lists, or one scalar broadcast to every row (e.g.
    "iteration": 3). domain and reward may be left out (null). Extra columns are kept, after."""
    if "sample_id" not in columns:
        raise ShardError("rollout table: column 'sample_id' is required")
    sid = _scalar_column(columns["sample_id"], pa.string(), None)
    n = len(sid)
    arrays, fields = [], []
    for f in _ROLLOUT_FIELDS:
        if f.name not in columns:
            if f.nullable and not pa.types.is_list(f.type):
                columns = {**columns, f.name: None}
            else:
                raise ShardError(f"rollout table: column {f.name!r} ({f.type}) is required")
        v = columns[f.name]
        col = list_column(v, f.type.value_type) if pa.types.is_list(f.type) else _scalar_column(v, f.type, n)
        arrays.append(sid if f.name == "sample_id" else col)
        fields.append(f)
    for name, v in columns.items():
        if name not in {f.name for f in _ROLLOUT_FIELDS}:
            col = v if isinstance(v, (pa.Array, pa.ChunkedArray)) else pa.array(v)
            arrays.append(col)
            fields.append(pa.field(name, col.type))
    _check_lengths(arrays, fields, n)
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def scored_table(rollout: pa.Table, teacher_logp: dict[str, Any], combined: Any, ref: Any = None,
                 topk: dict[str, tuple[Any, Any]] | None = None) -> pa.Table:
    """Rollout table + teacher_logp.NAME per teacher (dict order), the combined teacher_logp and
    optionally ref_logp. Each log-prob column: (flat, offsets), per-row float arrays (None: a teacher that
    did not score that row), or a pyarrow array. topk: {NAME: (ids, logp)} for teacher_topk_ids/logp.NAME,
    each given like a log-prob column with K values per response token (row-major [R, K]; None rows where
    the teacher did not score); written with provenance top_k = K."""
    names = check_teacher_names(teacher_logp)
    taken = [c for c in rollout.column_names if c.startswith(TEACHER_PREFIX) or c in ("teacher_logp", "ref_logp")]
    if taken:
        raise ShardError(f"scored table: the rollout table already has {taken}; pass the rollout columns only")
    table = rollout
    for name in names:
        table = table.append_column(pa.field(TEACHER_PREFIX + name, _LOGP, nullable=True),
                                    list_column(teacher_logp[name], pa.float32()))
    table = table.append_column(pa.field("teacher_logp", _LOGP, nullable=False), list_column(combined, pa.float32()))
    if ref is not None:
        table = table.append_column(pa.field("ref_logp", _LOGP, nullable=False), list_column(ref, pa.float32()))
    for name, (ids, logp) in (topk or {}).items():
        ids_f, logp_f = _topk_fields([name])
        table = table.append_column(ids_f, list_column(ids, pa.int32()))
        table = table.append_column(logp_f, list_column(logp, pa.float32()))
    return table


def _check_lengths(arrays: list, fields: list, n: int) -> None:
    for a, f in zip(arrays, fields):
        if len(a) != n:
            raise ShardError(f"column {f.name!r} has {len(a)} rows but sample_id has {n}")


# ---- validation -------------------------------------------------------------------------------------

def check_columns(schema: pa.Schema, kind: str, teacher_names: Sequence[str] | None, source: str,
                  top_k: int = 0) -> pa.Schema:
    """Every expected column present with its type, and exactly the declared teachers' columns
    (with top_k > 0 also the top-k column pairs of one or more of them, scoring writes all; without,
    none). Returns the expected schema. teacher_names=None: taken from the teacher_logp.NAME columns."""
    have = teacher_columns(schema.names)
    topk_cols = [c for c in schema.names if c.startswith((TOPK_IDS_PREFIX, TOPK_LOGP_PREFIX))]
    if topk_cols and not top_k:
        raise ShardError(f"{source}: columns {topk_cols} but no top_k in the provenance; write top-k columns "
                         f"with provenance top_k = K (storage.shards.build_provenance(..., top_k=K))")
    if kind == "scored":
        if teacher_names is None:
            teacher_names = have
        if not teacher_names:
            raise ShardError(f"{source}: scored shard has no teacher_logp.NAME column; score with at least one teacher")
        if sorted(have) != sorted(teacher_names):
            raise ShardError(f"{source}: teacher columns {have} do not match the declared teachers "
                             f"{list(teacher_names)}; write one teacher_logp.NAME column per configured teacher")
    elif kind != "rollout":
        raise ShardError(f"shard kind {kind!r} is unknown; use 'rollout' or 'scored'")
    elif have:
        raise ShardError(f"{source}: rollout shard has teacher columns {have}; write it as kind='scored'")
    if top_k and (not isinstance(top_k, int) or top_k < 0 or kind != "scored"):
        raise ShardError(f"{source}: provenance top_k={top_k!r} must be an integer >= 0 on a scored shard")
    exp = rollout_schema() if kind == "rollout" else scored_schema(teacher_names, "ref_logp" in schema.names)
    if top_k:
        topk_names = sorted({c.split(".", 1)[1] for c in topk_cols})
        if not topk_names or set(topk_names) - set(teacher_names):
            raise ShardError(f"{source}: provenance top_k={top_k} but top-k columns {topk_cols} (need a "
                             f"teacher_topk_ids/logp.NAME pair per declared teacher {list(teacher_names)}); "
                             f"score with scoring.top_k")
        exp = pa.schema(list(exp) + _topk_fields(topk_names))
    for f in exp:
        i = schema.get_field_index(f.name)
        if i < 0:
            raise ShardError(f"{source}: column {f.name!r} ({f.type}) is missing; build {kind} tables with "
                             f"storage.shards.{kind}_table")
        if schema.field(i).type != f.type:
            raise ShardError(f"{source}: column {f.name!r} has type {schema.field(i).type}, expected {f.type}; "
                             f"build it with storage.shards.list_array / {kind}_table")
    return exp


def _sample(table: pa.Table, row: int) -> str:
    """The sample_id of `row` and the row (counted from 0 in `source`, the part or table checked)."""
    try:
        return f"{table.column('sample_id')[int(row)].as_py()!r} (row {int(row)})"
    except Exception:  # noqa: BLE001 - naming the row is enough when sample_id is itself broken
        return f"(row {int(row)})"


def _lengths(col: pa.ChunkedArray) -> np.ndarray:
    """Per-row list lengths [rows] int64; -1 for null rows."""
    return pc.fill_null(pc.list_value_length(col), -1).to_numpy().astype(np.int64)


def _locate(lengths: np.ndarray, flat_index: int) -> tuple[int, int]:
    """(row, position in row) of a flattened value, given per-row lengths (-1 = null row)."""
    ends = np.cumsum(np.maximum(lengths, 0))
    row = int(np.searchsorted(ends, flat_index, side="right"))
    return row, int(flat_index - (ends[row - 1] if row else 0))


def validate_table(table: pa.Table, kind: str = "rollout", teacher_names: Sequence[str] | None = None,
                   vocab_size: int | None = None, source: str = "table", top_k: int = 0) -> None:
    """Raise ShardError (naming `source`, the column, the sample_id and the fix) unless every row is
    sound: required columns with their types, no nulls where not allowed, unique sample_id, every
    log-prob list as long as response_ids with finite values <= 0, token ids in [0, vocab_size),
    and with top_k the top-k columns (validate_topk)."""
    exp = check_columns(table.schema, kind, teacher_names, source, top_k)
    for f in exp:
        col = table.column(f.name)
        if not f.nullable and col.null_count:
            row = int(np.flatnonzero(pc.is_null(col).to_numpy(zero_copy_only=False))[0])
            raise ShardError(f"{source}: column {f.name!r} is null for sample_id {_sample(table, row)}; "
                             f"every row needs a value")
    if pc.count_distinct(table.column("sample_id")).as_py() != table.num_rows:
        counts = pc.value_counts(table.column("sample_id"))
        dup = [c["values"].as_py() for c in counts if c["counts"].as_py() > 1][:3]
        raise ShardError(f"{source}: sample_id repeated: {dup}; sample ids must be unique in the run "
                         f"(e.g. '<iteration>-<prompt_id>-<group_index>')")
    resp = _lengths(table.column("response_ids"))
    for f in exp:
        if f.type != _LOGP or f.name.startswith(TOPK_LOGP_PREFIX):
            continue
        lens = _lengths(table.column(f.name))
        bad = np.flatnonzero((lens >= 0) & (lens != resp))
        if bad.size:
            r = int(bad[0])
            raise ShardError(f"{source}: column {f.name!r} has {lens[r]} values for sample_id {_sample(table, r)} "
                             f"but response_ids has {resp[r]} tokens; log-probs are in response-token indexing "
                             f"(one per response token, no prompt positions)")
        vals = pc.list_flatten(table.column(f.name)).to_numpy()
        # The combined teacher_logp of combination=product is an unnormalized log-linear score
        # (may exceed 0); its inputs, the teacher_logp.NAME columns, are checked as log-probs.
        upper = np.inf if f.name == "teacher_logp" else LOGP_TOLERANCE
        wrong = ~np.isfinite(vals) | (vals > upper)
        if wrong.any():
            i = int(np.flatnonzero(wrong)[0])
            r, pos = _locate(lens, i)
            raise ShardError(f"{source}: column {f.name!r} has value {vals[i]} at response token {pos} of "
                             f"sample_id {_sample(table, r)}; log-probs must be finite and <= 0 (check for NaN/inf "
                             f"from the model, or probabilities/logits stored instead of log-probs)")
    for name in LIST_COLUMNS_INT:
        vals = pc.list_flatten(table.column(name)).to_numpy()
        wrong = (vals < 0) | ((vals >= vocab_size) if vocab_size is not None else False)
        if np.any(wrong):
            i = int(np.flatnonzero(wrong)[0])
            r, _ = _locate(_lengths(table.column(name)), i)
            raise ShardError(f"{source}: column {name!r} has token id {vals[i]} in sample_id {_sample(table, r)}, "
                             f"outside the vocabulary [0, {vocab_size}); the tokenizer of the data and the "
                             f"student differ")
    # iteration -1 marks offline data (opd score): not sampled in any iteration.
    for name, ok in (("group_index", lambda v: v >= 0), ("iteration", lambda v: v >= -1)):
        v = table.column(name).to_numpy()
        if v.size and not np.all(ok(v)):
            r = int(np.flatnonzero(~ok(v))[0])
            raise ShardError(f"{source}: column {name!r} is {v[r]} for sample_id {_sample(table, r)}; must be >= 0 "
                             f"(iteration may be -1 for offline data)")
    reward = pc.drop_null(table.column("reward")).to_numpy()
    if reward.size and not np.all(np.isfinite(reward)):
        r = int(np.flatnonzero(~np.isfinite(pc.fill_null(table.column("reward"), 0.0).to_numpy()))[0])
        raise ShardError(f"{source}: column 'reward' is {reward[~np.isfinite(reward)][0]} for sample_id "
                         f"{_sample(table, r)}; rewards must be finite (use null for 'no reward')")


def validate_topk(table: pa.Table, top_k: int, vocab_size: int | None = None, source: str = "table") -> None:
    """Each teacher_topk_ids/logp.NAME pair: null exactly where teacher_logp.NAME is, else K = top_k
    values per response token, ids in the vocabulary and distinct per position, log-probs finite,
    <= 0, sorted descending per position, and summing to at most 1 (up to LOGP_TOLERANCE)."""
    resp_all = _lengths(table.column("response_ids"))
    for name in [c[len(TOPK_IDS_PREFIX):] for c in table.column_names if c.startswith(TOPK_IDS_PREFIX)]:
        cols = (TOPK_IDS_PREFIX + name, TOPK_LOGP_PREFIX + name)
        scored = _lengths(table.column(TEACHER_PREFIX + name)) >= 0 if TEACHER_PREFIX + name in table.column_names \
            else np.ones(len(resp_all), bool)
        resp = np.where(scored, resp_all, -1)  # rows the teacher did not score: null, length -1
        for col in cols:
            lens = _lengths(table.column(col))
            bad = np.flatnonzero(lens != np.where(scored, resp * top_k, -1))
            if bad.size:
                r = int(bad[0])
                raise ShardError(f"{source}: column {col!r} has {lens[r]} values for sample_id {_sample(table, r)}, "
                                 f"expected top_k x response tokens = {top_k} x {resp_all[r]} (null where "
                                 f"{TEACHER_PREFIX + name} is); re-score with scoring.top_k")
        ids = pc.list_flatten(table.column(cols[0])).to_numpy().reshape(-1, top_k)
        lp = pc.list_flatten(table.column(cols[1])).to_numpy().reshape(-1, top_k)
        pos_len = np.repeat(np.arange(len(resp)), np.maximum(resp, 0))
        hi = vocab_size if vocab_size is not None else np.iinfo(np.int32).max
        checks = ((lambda: ((ids < 0) | (ids >= hi)).any(1), "token ids outside the vocabulary"),
                  (lambda: (np.diff(np.sort(ids, axis=1), axis=1) == 0).any(1), "a token id twice"),
                  (lambda: (~np.isfinite(lp) | (lp > LOGP_TOLERANCE)).any(1), "log-probs that are not finite and <= 0"),
                  (lambda: (np.diff(lp, axis=1) > 0).any(1), "log-probs not sorted largest first"),
                  (lambda: np.logaddexp.reduce(lp.astype(np.float64), axis=1) > LOGP_TOLERANCE,
                   "probabilities summing above 1"))
        for check, what in checks:  # in order: later checks assume the earlier ones passed
            wrong = check()
            if wrong.any():
                i = int(np.flatnonzero(wrong)[0])
                r = int(pos_len[i])
                j = i - int(np.concatenate([[0], np.cumsum(np.maximum(resp, 0))])[r])
                raise ShardError(f"{source}: teacher {name!r} top-k has {what} at response token {j} of sample_id "
                                 f"{_sample(table, r)}; the scorer must store each position's K most likely tokens "
                                 f"(ids, log-probs) largest first: re-score with scoring.top_k")
