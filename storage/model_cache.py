"""Model directories on an object store (any fsspec URL), copied once per node into a local cache.

    local = materialize("s3://bucket/RUN/checkpoints/iter-000002/hf")   # -> CACHE/<key>/
    local = materialize("/data/models/qwen")                            # a local path: itself

Models are read from local files (transformers, vLLM and safetensors' mmap need a path), so a URL
is downloaded into CACHE = $OPD_MODEL_CACHE (default ~/.cache/opd/models) and the copy is used:

- The key is a hash of what the directory holds. For an opd export (the hf/ of a checkpoint
  directory) that is the checkpoint's _MANIFEST.json entries for hf/ (name, bytes, sha256; the
  store's ETag for files too large to be checksummed there); for any other directory (a student or
  teacher uploaded by hand) the store's listing (name, size, ETag). Same key: no download at all.
- CACHE/<key>/ holds complete copies only: files are downloaded into CACHE/.<key>.partial/ (each
  to NAME.part, checked against its size and sha256, then renamed), and the directory is renamed
  into place when every file is there. A killed or failed download leaves the partial directory:
  the next attempt keeps the files that were complete and fetches only the rest.
- One download per key per node: processes (e.g. the ranks of one torchrun) take an fcntl lock
  on CACHE/.<key>.lock; the others wait for it and use the same copy.
- An export without its manifest (a checkpoint whose upload did not finish) is refused.

Entries are never changed after the rename; delete old ones freely when no run is using them.
Credentials and endpoints come from the store's usual configuration (for S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, ~/.aws/...).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import posixpath
from contextlib import contextmanager

from storage.errors import ManifestError, OpdError
from storage.fs import exists, filesystem, is_local
from storage.manifest import MANIFEST_NAME, read_manifest

log = logging.getLogger("opd.model_cache")
CACHE_ENV = "OPD_MODEL_CACHE"
EXPORT_DIR = "hf"  # the HF export inside a checkpoint directory (storage.checkpoints.hf_dir)


class ModelCacheError(OpdError):
    """A model URL that cannot be copied: unreachable store, refused credentials, missing object,
    unfinished export. The message names the URL."""


def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV) or "~/.cache/opd/models"))


def is_url(path: str) -> bool:
    """True for an fsspec URL of a non-local filesystem (s3://, gs://, memory://, ...)."""
    path = os.fspath(path)
    return "://" in path and not path.startswith("file://")


def materialize(url: str, what: str = "model") -> str:
    """A local directory with the contents of model directory `url`: the path itself when local,
    else the node's cached copy (downloaded when missing). ModelCacheError names the URL."""
    url = os.fspath(url)
    if not is_url(url):
        return url[len("file://"):] if url.startswith("file://") else url
    try:
        fs, path = filesystem(url)
        if is_local(fs):
            return path
        files, key = _plan(fs, path, url)
        return _download(fs, path, url, files, key)
    except OpdError:
        raise
    except PermissionError as err:
        raise ModelCacheError(f"{url}: the store refused access ({err}); check the credentials for {what} "
                              f"(for S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or ~/.aws)") from None
    except FileNotFoundError as err:
        raise ModelCacheError(f"{url}: not found on the store ({err}); check the bucket and path of {what}") from None
    except Exception as err:  # noqa: BLE001 - botocore/aiohttp connection errors share no base class
        raise ModelCacheError(f"{url}: cannot read from the store ({type(err).__name__}: {err}); check the "
                              f"endpoint and network (for S3: AWS_ENDPOINT_URL)") from None


def _plan(fs, path: str, url: str) -> tuple[list[tuple[str, int, str | None]], str]:
    """([(relative name, bytes, sha256 or None)], cache key) of the directory at `path`."""
    parent = posixpath.dirname(path)
    export = posixpath.basename(path) == EXPORT_DIR and (exists(fs, posixpath.join(parent, MANIFEST_NAME))
                                                         or exists(fs, posixpath.join(parent, "dcp")))
    if export:
        try:
            manifest = read_manifest(fs, parent)
        except ManifestError as err:
            raise ModelCacheError(f"{url}: {err}") from None
        if manifest is None:
            raise ModelCacheError(f"{url}: half-uploaded export: {fs.unstrip_protocol(parent)} has no "
                                  f"{MANIFEST_NAME} (the train stage that wrote it did not finish); resume "
                                  f"the run to redo that iteration's training")
        prefix = EXPORT_DIR + "/"
        files = [(p.name[len(prefix):], p.bytes, p.sha256) for p in manifest.parts if p.name.startswith(prefix)]
        if not files:
            raise ModelCacheError(f"{url}: the checkpoint manifest lists no {prefix} files; not an opd export")
        # files above the manifest's checksum limit are size-only there: their ETag joins the key
        tags = {n: _etag(fs.info(posixpath.join(path, n))) for n, _, sha in files if sha is None}
        source = {"export": sorted(files), "etags": tags}
    else:
        try:
            fs.invalidate_cache(path)
        except Exception:  # noqa: BLE001 - some filesystems keep no listing cache
            pass
        listing = fs.find(path, detail=True)
        files, tags = [], {}
        for name, info in sorted(listing.items()):
            rel = posixpath.relpath(name.rstrip("/"), path)
            if info.get("type") == "directory" or rel.startswith(".."):
                continue
            files.append((rel, int(info["size"]), None))
            tags[rel] = _etag(info)
        if not files:
            raise ModelCacheError(f"{url}: no files under this URL; check the bucket and path of the model")
        source = {"listing": files, "etags": tags}
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:32]
    return files, key


def _etag(info: dict) -> str:
    for k in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime", "created"):
        if info.get(k) is not None:
            return str(info[k])
    return ""


@contextmanager
def _locked(path: str):
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _complete(local: str, size: int, sha256: str | None) -> bool:
    if not os.path.isfile(local) or os.path.getsize(local) != size:
        return False
    if sha256 is None:
        return True
    h = hashlib.sha256()
    with open(local, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest() == sha256


def _download(fs, path: str, url: str, files: list, key: str) -> str:
    root = cache_root()
    final = os.path.join(root, key)
    if os.path.isdir(final):
        return final
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, f".{key}.lock")):
        if os.path.isdir(final):  # another process downloaded it while we waited
            return final
        partial = os.path.join(root, f".{key}.partial")
        fetched = 0
        for rel, size, sha in files:
            dst = os.path.join(partial, *rel.split("/"))
            if _complete(dst, size, sha):  # from an earlier attempt that did not finish
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            tmp = dst + ".part"
            src = posixpath.join(path, rel)
            try:
                fs.get_file(src, tmp)
            except FileNotFoundError:
                raise ModelCacheError(f"{fs.unstrip_protocol(src)}: missing on the store but listed for {url}; "
                                      f"the model directory is damaged (for a checkpoint: delete its "
                                      f"{MANIFEST_NAME} and resume to redo it)") from None
            if not _complete(tmp, size, sha):
                got = os.path.getsize(tmp)
                os.remove(tmp)
                raise ModelCacheError(f"{fs.unstrip_protocol(src)}: the download ({got} bytes) does not match its "
                                      f"listing ({size} bytes{', sha256' if sha else ''}); the object changed "
                                      f"during the copy or is corrupt, retry")
            os.replace(tmp, dst)
            fetched += size
        log.info("model cache: %s -> %s (%.1f MB downloaded)", url, final, fetched / 2**20)
        os.replace(partial, final)
    return final

