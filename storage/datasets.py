"""User datasets in: prompt sets and offline prompt+response sets (Parquet or JSONL, any fsspec URL).

A prompt set has a `prompt` column (text) or a `messages` column (chat: a list of {role, content}
per row; opd_tasks.prompts applies the student's chat template to it), or both (a row uses its
messages when they are not null), and, optionally, `answer` (for the domain verifier),
`domain` (for routing and per-domain accuracy) and `prompt_id` (stable id; made from the row
number when absent). Errors name the file, the column and the fix.
"""
from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq

from storage.errors import DataError
from storage.fs import exists, read_bytes

FORMATS = (".parquet", ".jsonl", ".json")


def read_table(path: str, storage_options: dict | None = None) -> pa.Table:
    """Read a whole Parquet or JSONL file through fsspec."""
    fs, p = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if not exists(fs, p):
        raise DataError(f"{path}: dataset not found; check the path in the config (data.train / data.eval) "
                        f"or the --input option")
    if not p.endswith(FORMATS):
        raise DataError(f"{path}: unsupported format; use one of {', '.join(FORMATS)}")
    data = pa.BufferReader(read_bytes(fs, p))  # I/O errors retried there; what follows is the content
    try:
        return pq.read_table(data) if p.endswith(".parquet") else pajson.read_json(data)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{path}: cannot be read as {p.rsplit('.', 1)[-1]}: {err}") from None


def read_prompts(path: str, storage_options: dict | None = None, need: tuple[str, ...] = ()) -> pa.Table:
    """Prompt set with columns prompt_id, prompt, answer, domain (answer/domain null when absent).

    need: extra columns that must be present and non-null (e.g. ("domain",) for routing,
    ("answer",) when the loss uses verifier rewards).
    """
    table = read_table(path, storage_options)
    if "prompt" not in table.column_names and "messages" not in table.column_names:
        raise DataError(f"{path}: missing required column 'prompt' (found: {table.column_names}); a prompt set "
                        f"needs a text column named prompt (or a chat column named messages)")
    if table.num_rows == 0:
        raise DataError(f"{path}: the prompt set is empty; give a file with at least one row (config "
                        f"data.train / data.eval)")
    for col in need:
        if col not in table.column_names:
            raise DataError(f"{path}: missing column {col!r} (found: {table.column_names}), required by this "
                            f"run's config (combination=route needs domain; verifier rewards need answer)")
        nulls = table.column(col).null_count
        if nulls:
            raise DataError(f"{path}: column {col!r} has {nulls} null value(s); every row needs one")
    n = table.num_rows
    cols = {
        "prompt_id": (table.column("prompt_id").cast(pa.string()) if "prompt_id" in table.column_names
                      else pa.array([f"p{i:08d}" for i in range(n)], pa.string())),
        "prompt": (table.column("prompt").cast(pa.string()) if "prompt" in table.column_names
                   else pa.nulls(n, pa.string())),
        "answer": (table.column("answer").cast(pa.string()) if "answer" in table.column_names
                   else pa.nulls(n, pa.string())),
        "domain": (table.column("domain").cast(pa.string()) if "domain" in table.column_names
                   else pa.nulls(n, pa.string())),
    }
    if "messages" in table.column_names:
        cols["messages"] = _messages(table.column("messages"), path)
    out = pa.table(cols)
    missing = [i for i, (p, m) in enumerate(zip(out.column("prompt").to_pylist(),
                                                out.column("messages").to_pylist() if "messages" in cols else [None] * n))
               if p is None and m is None]
    if missing:
        raise DataError(f"{path}: row {missing[0]} ({len(missing)} in all) has neither a prompt nor messages; "
                        f"every row needs one")
    ids = out.column("prompt_id")
    if len(ids.unique()) != n:
        raise DataError(f"{path}: column 'prompt_id' has duplicate values; ids must be unique")
    return out


MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def _messages(col: pa.ChunkedArray, path: str) -> pa.ChunkedArray:
    """A `messages` column as list<struct<role, content>> (strings), checked row by row."""
    try:
        col = col.cast(MESSAGES)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise DataError(f"{path}: column 'messages' must hold a list of {{role, content}} per row "
                        f"(strings), found {col.type} ({err})") from None
    for i, row in enumerate(col.to_pylist()):
        if row is None:
            continue
        if not row:
            raise DataError(f"{path}: row {i} has an empty 'messages' list; give at least one message")
        for j, m in enumerate(row):
            if m is None or m["role"] is None or m["content"] is None:
                raise DataError(f"{path}: row {i}, message {j} of column 'messages' lacks a role or content")
    return col
