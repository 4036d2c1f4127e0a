"""Small-file I/O through fsspec, committed atomically on every kind of filesystem.

    fs, path = filesystem("s3://bucket/runs/a", {"key": ..., "secret": ...})
    write_json_atomic(fs, path + "/run.json", {"a": 1})   # readers never see half a file
    append_jsonl(fs, path + "/metrics.jsonl", {"iteration": 0, "loss": 1.2})

How a file is committed:
- local disk: written to `.NAME.<random>.tmp` in the same directory, fsynced, then os.replace;
- object stores (s3, gcs, azure) and memory://: one whole-object write of bytes built in memory
  (an object is visible only once its PUT completes, so there is no half object to see);
- any other filesystem: temporary name, then fs.mv.
"""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import OpdError
from storage.faults import fault_point

TMP_SUFFIX = ".tmp"
WHOLE_OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory"}


def filesystem(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or fsspec URL; the path has no trailing '/'."""
    if not url or not str(url).strip():
        raise OpdError("empty path: give a local directory or an fsspec URL (s3://bucket/dir, memory://dir)")
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path.rstrip("/") or path


def protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def tmp_name(path: str) -> str:
    """dir/.NAME.<random>.tmp: hidden, so directory readers (pyarrow, pandas) skip it."""
    head, name = posixpath.split(path)
    return posixpath.join(head, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing (or the old file) or all of it."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = tmp_name(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.endswith("_MANIFEST.json"):
                fault_point("manifest")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return
    if protocols(fs) & WHOLE_OBJECT_PROTOCOLS:
        fs.pipe_file(path, data)
        return
    tmp = tmp_name(path)
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def write_text_atomic(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    write_bytes_atomic(fs, path, text.encode("utf-8"))


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """JSON (indented, strict: NaN/inf are refused with an error naming the file)."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    except (TypeError, ValueError) as err:
        raise OpdError(f"{path}: cannot write as JSON ({err}); pass plain numbers, strings, lists, dicts") from None
    write_text_atomic(fs, path, text + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):  # numpy scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return fs.cat_file(path)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    try:
        return fs.exists(path)
    except (FileNotFoundError, OSError):
        return False


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parsed JSON of `path`; FileNotFoundError when missing, OpdError (naming the file) when invalid."""
    data = read_bytes(fs, path)
    try:
        return json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise OpdError(f"{path}: not valid JSON ({err}); the file is corrupt, delete it and redo its step") from None


def append_jsonl(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    """Append one JSON line. Read + atomic rewrite: on object stores (no append) earlier lines are kept
    and a crash leaves the old or the new file, never a torn one. Fine at a line per iteration."""
    try:
        line = json.dumps(obj, allow_nan=False, default=_json_default, separators=(",", ":"))
    except (TypeError, ValueError) as err:
        raise OpdError(f"{path}: cannot append as JSON ({err})") from None
    old = read_bytes(fs, path) if exists(fs, path) else b""
    if old and not old.endswith(b"\n"):
        old += b"\n"
    write_bytes_atomic(fs, path, old + line.encode("utf-8") + b"\n")


def read_jsonl(fs: fsspec.AbstractFileSystem, path: str) -> list[Any]:
    """Every line of a JSONL file ([] when missing); OpdError naming the file and line when invalid."""
    if not exists(fs, path):
        return []
    out = []
    for i, line in enumerate(read_bytes(fs, path).decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise OpdError(f"{path}: line {i} is not valid JSON ({err})") from None
    return out


def list_dir(fs: fsspec.AbstractFileSystem, path: str) -> list[dict]:
    """Entries of a directory as fsspec info dicts with 'basename' added; [] when it does not exist.
    Listing caches are dropped first, so files written by other processes are seen."""
    try:
        fs.invalidate_cache(path)
    except Exception:  # noqa: BLE001 - best effort; some filesystems have no cache
        pass
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for e in entries:
        name = e["name"].rstrip("/")
        if name == path.rstrip("/"):
            continue  # some filesystems list a file as itself
        out.append({**e, "basename": posixpath.basename(name)})
    return out


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
