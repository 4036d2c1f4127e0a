"""Parquet shards of a stage: atomic part writes with provenance, and readers that trust the manifest.

    prov = build_provenance("scored", iteration=3, config_hash=h, teachers=[{"name": "math", "path": p,
                            "weight": 1.0}], combination="mixture", tokenizer_path=tok_dir, ...)
    done = finished_parts(fs, stage, expect={"config_hash": h})    # resume: parts already committed
    info = wait_committed(fs, rollout_stage, 3, {"config_hash": h}, writing=alive)  # streaming: part 3
    for i, rows in enumerate(chunks):
        if i not in done:
            done[i] = write_part(fs, stage, i, scored_table(...), prov)
    commit_parts(fs, stage, "scored", done, config_hash=h, inputs={"rollout": rollout_stage})
    table = read_stage(fs, stage)                                   # checksums verified
    for batch in iter_token_batches(fs, stage, token_budget=8192): ...

Files: part-00000.parquet, ... (zstd, page checksums, row groups sized by bytes); provenance JSON in
the Parquet schema metadata under b"opd" (any Parquet reader sees it as key "opd"). Plain Parquet:
pyarrow, pandas, DuckDB and HF datasets open the parts directly.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from typing import Any, Callable, Iterator, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from storage.columns import (TEACHER_PREFIX, check_columns, check_teacher_names, flat_logp, list_array,  # noqa: F401
                             list_column, pack, rollout_schema, rollout_table, scored_schema, scored_table,
                             teacher_columns, validate_table, validate_topk)
from storage.errors import ManifestError, ShardError
from storage.fs import exists, filesystem, list_dir, read_bytes, retried, sha256_hex
from storage.manifest import (MANIFEST_NAME, SCHEMA_VERSION, Manifest, PartInfo, commit_manifest,  # noqa: F401
                              read_manifest, read_part_verified, stage_status, stray_files, write_file_part)

log = logging.getLogger("opd.storage")
PROVENANCE_KEY = b"opd"
PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
ROW_GROUP_BYTES = 32 << 20
KINDS = ("rollout", "scored")


def part_name(index: int) -> str:
    if not isinstance(index, int) or not 0 <= index <= 99_999:
        raise ShardError(f"part index {index!r} must be an integer in 0..99999")
    return f"part-{index:05d}.parquet"


def part_index(name: str) -> int:
    """part-00003.parquet -> 3 (ShardError for any other name)."""
    m = PART_RE.match(name)
    if not m:
        raise ShardError(f"{name!r} is not a part file name (part-NNNNN.parquet)")
    return int(m.group(1))


def build_provenance(kind: str, *, iteration: int | None, config_hash: str | None,
                     teachers: Sequence[dict] = (), combination: str | None = None,
                     tokenizer_path: str | None = None, tokenizer_fingerprint: str | None = None,
                     student_checkpoint: str | None = None, **extra: Any) -> dict:
    """The provenance stored in every part. teachers: [{"name", "path", "weight", ...}] (scored).
    Extra keys (sampling params, reference path, ...) are kept as given; all must be JSON."""
    if kind not in KINDS:
        raise ShardError(f"provenance kind {kind!r} is unknown; use one of {KINDS}")
    teachers = [dict(t) for t in teachers]
    check_teacher_names(t.get("name") for t in teachers)
    return {"kind": kind, "schema_version": SCHEMA_VERSION, "iteration": iteration, "config_hash": config_hash,
            "teachers": teachers, "combination": combination, "tokenizer_path": tokenizer_path,
            "tokenizer_fingerprint": tokenizer_fingerprint, "student_checkpoint": student_checkpoint, **extra}


def _declared_teachers(provenance: dict) -> list[str] | None:
    t = provenance.get("teachers")
    if not t:
        return None
    return [x["name"] if isinstance(x, dict) else x for x in t]


def write_part(fs: fsspec.AbstractFileSystem, stage_dir: str, index: int, table: pa.Table, provenance: dict,
               vocab_size: int | None = None, row_group_bytes: int = ROW_GROUP_BYTES) -> PartInfo:
    """Validate every row, then commit stage_dir/part-{index:05d}.parquet atomically.
    provenance["kind"] ("rollout"/"scored") picks the schema; for scored parts provenance["teachers"]
    must name exactly the teacher_logp.NAME columns. Returns the PartInfo for the manifest."""
    if not isinstance(provenance, dict) or provenance.get("kind") not in KINDS:
        raise ShardError(f"{stage_dir}: provenance must be a dict with kind in {KINDS} (use build_provenance)")
    kind = provenance["kind"]
    path = posixpath.join(stage_dir, part_name(index))
    top_k = provenance.get("top_k") or 0
    validate_table(table, kind, _declared_teachers(provenance), vocab_size, source=path, top_k=top_k)
    if top_k:
        validate_topk(table, top_k, vocab_size, source=path)
    meta = {**provenance, "schema_version": SCHEMA_VERSION}
    try:
        blob = json.dumps(meta, allow_nan=False, sort_keys=True).encode()
    except (TypeError, ValueError) as err:
        raise ShardError(f"{path}: provenance is not JSON ({err}); pass plain strings and numbers") from None
    exp = {f.name: f for f in check_columns(table.schema, kind, _declared_teachers(provenance), path, top_k)}
    schema = pa.schema([exp.get(f.name, f) for f in table.schema], metadata={PROVENANCE_KEY: blob})
    table = table.cast(schema)
    per_row = max(1, table.nbytes // max(1, table.num_rows))
    sink = pa.BufferOutputStream()
    # dictionary-encode strings only: on token-id and log-prob lists it costs 5x time and ~30% size
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    pq.write_table(table, sink, row_group_size=max(1, row_group_bytes // per_row), compression="zstd",
                   use_dictionary=strings, write_page_checksum=True)
    return write_file_part(fs, stage_dir, part_name(index), sink.getvalue().to_pybytes(), rows=table.num_rows)


def commit_parts(fs: fsspec.AbstractFileSystem, stage_dir: str, stage: str, parts: dict[int, PartInfo] | list,
                 config_hash: str | None, inputs: dict | None = None, extra: dict | None = None) -> Manifest:
    """Write the stage's manifest listing `parts` (in index order): from now on the stage is done."""
    items = sorted(parts.values() if isinstance(parts, dict) else parts, key=lambda p: p.name)
    m = Manifest(stage=stage, config_hash=config_hash, inputs=inputs or {}, parts=items, extra=extra or {})
    commit_manifest(fs, stage_dir, m)
    return m


# ---- reading -------------------------------------------------------------------------------------

def _provenance(schema: pa.Schema, path: str) -> dict:
    raw = (schema.metadata or {}).get(PROVENANCE_KEY)
    if raw is None:
        raise ShardError(f"{path}: no opd provenance in the Parquet metadata; not written by opd "
                         f"(write shards with storage.shards.write_part)")
    try:
        prov = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{path}: provenance metadata is not JSON ({err}); the file is corrupt") from None
    if not isinstance(prov, dict):
        raise ShardError(f"{path}: provenance metadata is not a JSON object; the file is corrupt")
    version = prov.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{path}: shard schema_version {version!r}, this opd reads {SCHEMA_VERSION}; "
                         f"rewrite the stage with this version (delete its directory and resume)")
    if prov.get("kind") not in KINDS:
        raise ShardError(f"{path}: provenance kind {prov.get('kind')!r} is not one of {KINDS}")
    try:
        teachers = _declared_teachers(prov)
    except (KeyError, TypeError):
        raise ShardError(f"{path}: provenance 'teachers' is malformed (need a list of {{'name': ...}}); "
                         f"the file is corrupt or not written by opd") from None
    check_columns(schema, prov["kind"], teachers, path, prov.get("top_k") or 0)
    return prov


def _open(data: bytes, path: str) -> tuple[pq.ParquetFile, dict]:
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err}); it is truncated or corrupt, "
                         f"delete it and redo its stage") from None
    return pf, _provenance(schema, path)


def _read(pf: pq.ParquetFile, path: str, columns: Sequence[str] | None) -> pa.Table:
    if columns is not None:
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise ShardError(f"{path}: no column(s) {missing}; it has {pf.schema_arrow.names}")
    try:
        return pf.read(columns=list(columns) if columns is not None else None)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ShardError(f"{path}: data pages cannot be read ({err}); the file is corrupt, delete it "
                         f"and redo its stage") from None


def finished_parts(fs: fsspec.AbstractFileSystem, stage_dir: str, expect: dict | None = None) -> dict[int, PartInfo]:
    """Parts already committed in a stage, by index, for resuming it. With a manifest: its parts.
    Without: every part-NNNNN.parquet that reads back whole (schema, provenance, all pages) and whose
    provenance matches `expect` (e.g. {"config_hash": h, "iteration": 3}); others are skipped with a
    warning and will be overwritten."""
    manifest = read_manifest(fs, stage_dir)
    if manifest is not None:
        return {int(PART_RE.match(p.name).group(1)): p for p in manifest.parts if PART_RE.match(p.name)}
    out: dict[int, PartInfo] = {}
    for e in list_dir(fs, stage_dir):
        m = PART_RE.match(e["basename"])
        if m and (info := _committed_part(fs, e["name"], e["basename"], expect)) is not None:
            out[int(m.group(1))] = info
    return out


def _committed_part(fs: fsspec.AbstractFileSystem, path: str, name: str, expect: dict | None,
                    warn: bool = True) -> PartInfo | None:
    """PartInfo of the part file at `path` when it reads back whole and its provenance matches `expect`."""
    data = read_bytes(fs, path)
    try:
        pf, prov = _open(data, path)
        _read(pf, path, None)
    except ShardError as err:
        if warn:
            log.warning("ignoring unreadable part (it will be rewritten): %s", err)
        return None
    wrong = {k: prov.get(k) for k, v in (expect or {}).items() if prov.get(k) != v}
    if wrong:
        if warn:
            log.warning("ignoring part %s written for %s, expected %s", path, wrong, expect)
        return None
    return PartInfo(name=name, rows=pf.metadata.num_rows, bytes=len(data), sha256=sha256_hex(data))


def wait_committed(fs: fsspec.AbstractFileSystem, stage_dir: str, index: int | None, expect: dict | None,
                   writing: Callable[[], bool], poll: float = 0.05) -> PartInfo | Manifest | None:
    """Streaming: wait while another thread writes the stage (`writing()` true) for its part `index`
    to be committed (its PartInfo: the manifest's entry once the stage is done, else the part file once
    it reads back whole with provenance matching `expect`, as finished_parts), or with index None for
    its manifest. None when the writer stopped without committing it (or the manifest lacks it)."""
    name = None if index is None else part_name(index)
    while True:
        stopped = not writing()  # before looking: what was committed before the writer stopped is seen
        m = read_manifest(fs, stage_dir)
        if m is not None:
            return m if name is None else next((p for p in m.parts if p.name == name), None)
        path = None if name is None else posixpath.join(stage_dir, name)
        if path is not None and exists(fs, path) and (info := _committed_part(fs, path, name, expect, warn=stopped)):
            return info
        if stopped:
            return None
        time.sleep(poll)


def _manifest_or_fail(fs: fsspec.AbstractFileSystem, stage_dir: str) -> Manifest:
    manifest = read_manifest(fs, stage_dir)
    if manifest is None:
        raise ManifestError(f"{stage_dir}: stage is {stage_status(fs, stage_dir)}, not done (no {MANIFEST_NAME}); "
                            f"run or resume the step that writes it (`opd resume RUN`)")
    stray = stray_files(fs, stage_dir)
    if stray:
        log.warning("%s: ignoring %d file(s) not in the manifest: %s", stage_dir, len(stray), stray[:5])
    return manifest


def _same_kind(first: dict, prov: dict, path: str) -> None:
    for key in ("kind", "teachers", "combination", "top_k"):
        if prov.get(key) != first.get(key):
            raise ShardError(f"{path}: provenance {key}={prov.get(key)!r} differs from the stage's first part "
                             f"({first.get(key)!r}); one stage holds one kind of shard")


def read_part(fs: fsspec.AbstractFileSystem, stage_dir: str, part: PartInfo,
              columns: Sequence[str] | None = None) -> pa.Table:
    """One part listed in a manifest, checked against its size and sha256, schema version and
    columns (to process a stage part by part, e.g. scoring a rollout stage)."""
    path = posixpath.join(stage_dir, part.name)
    pf, _ = _open(read_part_verified(fs, stage_dir, part), path)
    t = _read(pf, path, columns)
    if part.rows is not None and t.num_rows != part.rows:
        raise ShardError(f"{path}: {t.num_rows} rows but the manifest says {part.rows}")
    return t


def read_stage(fs: fsspec.AbstractFileSystem, stage_dir: str, columns: Sequence[str] | None = None) -> pa.Table:
    """Every row of a done stage, from the manifest's parts only, each checked against its size and
    sha256 first. The schema metadata (provenance) is the first part's. ManifestError when the
    stage is not done or a checksum fails; ShardError when a part is unreadable or mismatched."""
    manifest = _manifest_or_fail(fs, stage_dir)
    tables, first = [], None
    for p in manifest.parts:
        path = posixpath.join(stage_dir, p.name)
        t = read_part(fs, stage_dir, p, columns)
        prov = json.loads(t.schema.metadata[PROVENANCE_KEY])
        first = first or prov
        _same_kind(first, prov, path)
        if tables and t.schema.remove_metadata() != tables[0].schema.remove_metadata():
            raise ShardError(f"{path}: columns {t.schema.names} differ from the stage's first part "
                             f"{tables[0].schema.names}; one stage has one schema")
        tables.append(t)
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables).replace_schema_metadata(tables[0].schema.metadata)


def _stage_files(fs: fsspec.AbstractFileSystem, manifest: Manifest, stage_dir: str) -> tuple[list[str], pa.Schema]:
    """Paths of the manifest's parts and their common schema (footers only), checked alike."""
    paths, schema, first = [], None, None
    for p in manifest.parts:
        path = posixpath.join(stage_dir, p.name)
        try:
            s = _read_schema(fs, path)
        except FileNotFoundError:
            raise ManifestError(f"{path}: listed in {MANIFEST_NAME} but missing; delete the manifest to "
                                f"redo the stage") from None
        except (pa.ArrowException, OSError, ValueError) as err:
            raise ShardError(f"{path}: not a readable Parquet file ({err})") from None
        prov = _provenance(s, path)
        first = first or prov
        _same_kind(first, prov, path)
        if schema is not None and s.remove_metadata() != schema.remove_metadata():
            raise ShardError(f"{path}: columns {s.names} differ from the stage's first part {schema.names}")
        schema = schema or s
        paths.append(path)
    return paths, schema


def iter_token_batches(fs: fsspec.AbstractFileSystem, stage_dir: str, token_budget: int,
                       columns: Sequence[str] | None = None, padded: bool = False,
                       verify: bool = True) -> Iterator[pa.Table]:
    """Consecutive rows of a done stage (pyarrow.dataset over the manifest's parts), in order, grouped
    so that each batch's tokens (len(prompt_ids) + len(response_ids) summed, or with padded=True,
    rows * longest row) stay <= token_budget. A single row longer than the budget is its own batch.
    verify=True checks every part's sha256 first (one extra read)."""
    if token_budget <= 0:
        raise ShardError(f"token_budget must be > 0, got {token_budget}")
    manifest = _manifest_or_fail(fs, stage_dir)
    if verify:
        for p in manifest.parts:
            read_part_verified(fs, stage_dir, p)
    paths, schema = _stage_files(fs, manifest, stage_dir)
    if not paths:
        return
    cols = None if columns is None else list(dict.fromkeys([*columns, "prompt_ids", "response_ids"]))
    dataset = ds.dataset(paths, schema=schema, filesystem=fs, format="parquet")
    pending: list[pa.RecordBatch] = []
    rows = total = longest = 0

    def cost(n: int, tot: int, mx: int) -> int:
        return n * mx if padded else tot

    def flush() -> pa.Table:
        t = pa.Table.from_batches(pending, schema=pending[0].schema)
        return t.select(list(columns)) if columns is not None else t

    for rb in dataset.to_batches(columns=cols):
        lens = (pc.list_value_length(rb.column("prompt_ids")).to_numpy()
                + pc.list_value_length(rb.column("response_ids")).to_numpy()).astype(np.int64)
        start = 0
        for i, n in enumerate(lens):
            if rows and cost(rows + 1, total + n, max(longest, n)) > token_budget:
                pending.append(rb.slice(start, i - start))
                yield flush()
                pending, rows, total, longest, start = [], 0, 0, 0, i
            rows, total, longest = rows + 1, total + int(n), max(longest, int(n))
        if start < rb.num_rows:
            pending.append(rb.slice(start))
    if rows:
        yield flush()


def read_provenance(fs: fsspec.AbstractFileSystem, path: str) -> dict:
    """Provenance of a part file, or of a stage directory (its manifest's first part, else its first
    committed part). ShardError when there is none or it does not match this schema version."""
    if fs.isdir(path):
        manifest = read_manifest(fs, path)
        names = [p.name for p in manifest.parts] if manifest else \
            sorted(e["basename"] for e in list_dir(fs, path) if PART_RE.match(e["basename"]))
        if not names:
            raise ShardError(f"{path}: no Parquet parts to read provenance from")
        path = posixpath.join(path, names[0])
    if not exists(fs, path):
        raise ShardError(f"{path}: no such shard")
    try:
        schema = _read_schema(fs, path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise ShardError(f"{path}: not a readable Parquet file ({err})") from None
    return _provenance(schema, path)


def _read_schema(fs: fsspec.AbstractFileSystem, path: str) -> pa.Schema:
    """The footer's schema; I/O errors (OSError) are retried (storage.fs.retried), a corrupt footer
    (ArrowInvalid) is not."""
    def read() -> pa.Schema:
        with fs.open(path, "rb") as f:
            return pq.read_schema(f)
    return retried(fs, path, "reading its Parquet footer", read)


def load_hf_dataset(stage_dir: str, storage_options: dict | None = None, columns: Sequence[str] | None = None,
                    fs: fsspec.AbstractFileSystem | None = None):
    """A done stage as a `datasets.Dataset` (in memory, checksums verified; types kept: list<int32>
    stays int32 in arrow format). stage_dir is a URL, or a path in `fs`."""
    import datasets
    from datasets.table import InMemoryTable

    if fs is None:
        fs, stage_dir = filesystem(stage_dir, storage_options)
    return datasets.Dataset(InMemoryTable(read_stage(fs, stage_dir, columns)))
