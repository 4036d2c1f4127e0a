"""Small-file I/O through fsspec, committed atomically on every kind of filesystem.

    fs, path = filesystem("s3://bucket/runs/a", {"key": ..., "secret": ...})
    write_json_atomic(fs, path + "/run.json", {"a": 1})   # readers never see half a file
    append_jsonl(fs, path + "/metrics.jsonl", {"iteration": 0, "loss": 1.2})

How a file is committed:
- local disk: written to `.NAME.<random>.tmp` in the same directory, fsynced, then os.replace;
- object stores (s3, gcs, azure) and memory://: one whole-object write of bytes built in memory
  (an object is visible only once its PUT completes, so there is no half object to see);
- any other filesystem: temporary name, then fs.mv.

Storage errors are not "missing": only a definite not-found (FileNotFoundError) means absent. Any
other OSError of a read, listing or whole-object write (throttling, a transient permission or
network error) is retried IO_ATTEMPTS times with exponential backoff, then raised as StorageError
naming the URL. No space / read-only storage are not retried: StorageFullError names the path and
what to free. A failed write leaves no file that counts (a local temporary is removed; a manifest
is written only after its parts).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import posixpath
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from storage.errors import OpdError, StorageError, StorageFullError
from storage.faults import fault_point

TMP_SUFFIX = ".tmp"
WHOLE_OBJECT_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "opdfault"}
IO_ATTEMPTS = int(os.environ.get("OPD_IO_ATTEMPTS", "5"))          # tries of one storage call
IO_BACKOFF_S = float(os.environ.get("OPD_IO_BACKOFF_S", "0.5"))    # first wait; x3 each retry (20 s in all)
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
READ_ONLY = {errno.EROFS}
T = TypeVar("T")


def url_of(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The URL a user would type for `path` on `fs` (a plain path on local disk)."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def storage_failure(err: OSError, url: str, what: str, local: bool = False) -> OpdError | None:
    """The one-line error of a write that waiting will not fix (no space, read-only; on a local disk
    also no permission: remote 403s may be transient and are retried), else None."""
    code = getattr(err, "errno", None)
    if local and code in (errno.EACCES, errno.EPERM):
        return StorageFullError(f"{url}: permission denied ({what}); make {os.path.dirname(url) or url} writable "
                                f"for this user or choose another run directory, then `opd resume` the run")
    if code in NO_SPACE:
        where = (f"df -h {os.path.dirname(url) or url}" if "://" not in url
                 else "a bucket quota or the local temp dir of an upload")
        return StorageFullError(f"{url}: no space left ({what}); free space where it is written ({where}; finished "
                                f"runs' checkpoints/ are the largest files), then `opd resume` the run: finished "
                                f"stages are kept")
    if code in READ_ONLY:
        return StorageFullError(f"{url}: the storage is read-only ({what}); make it writable or choose another run "
                                f"directory, then `opd resume` the run")
    return None


def retried(fs: fsspec.AbstractFileSystem, path: str, what: str, call: Callable[[], T],
            not_found: tuple[type[BaseException], ...] = (FileNotFoundError,)) -> T:
    """call() with bounded retries of OSErrors that may be transient (remote storage; a local disk's
    errors are definite: one try). `not_found` errors are re-raised at once (a definite answer); no
    space / read-only become StorageFullError at once; anything else that still fails becomes
    StorageError naming the URL."""
    attempts = 1 if is_local(fs) else max(1, IO_ATTEMPTS)
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except not_found:
            raise
        except OSError as err:
            final = storage_failure(err, url_of(fs, path), what)
            if final is not None:
                raise final from err
            if attempt == attempts:
                tries = f" {attempt} times" if attempt > 1 else ""
                raise StorageError(f"{url_of(fs, path)}: {what} failed{tries} ({type(err).__name__}: {err}); check "
                                   f"that the storage is reachable and the credentials allow it, then `opd resume` "
                                   f"the run (nothing finished is redone)") from err
            time.sleep(IO_BACKOFF_S * 3 ** (attempt - 1))
    raise AssertionError("unreachable")


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
    what = f"writing {len(data)} bytes"
    if is_local(fs):
        tmp = tmp_name(path)
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.endswith("_MANIFEST.json"):
                fault_point("manifest")
            os.replace(tmp, path)
        except BaseException as err:
            if os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(err, OSError) and (final := storage_failure(err, path, what, local=True)) is not None:
                raise final from err
            raise
        return
    if protocols(fs) & WHOLE_OBJECT_PROTOCOLS:  # one PUT: all or nothing, so retrying is safe
        retried(fs, path, what, lambda: fs.pipe_file(path, data), not_found=())
        return
    tmp = tmp_name(path)
    retried(fs, path, what, lambda: fs.pipe_file(tmp, data), not_found=())
    retried(fs, path, f"renaming {tmp} to it", lambda: fs.mv(tmp, path))


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
    """The whole file; FileNotFoundError when it does not exist, StorageError when it cannot be read."""
    return retried(fs, path, "reading", lambda: fs.cat_file(path))


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True/False only on a definite answer: a storage error is retried, then raised (StorageError),
    never taken for "missing" (a manifest that looks absent would have its stage redone)."""
    try:
        retried(fs, path, "checking whether it exists", lambda: fs.info(path))
        return True
    except FileNotFoundError:
        return False


def size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    return int(retried(fs, path, "reading its size", lambda: fs.size(path)))


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
        entries = retried(fs, path, "listing", lambda: fs.ls(path, detail=True),
                          not_found=(FileNotFoundError, NotADirectoryError))
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
