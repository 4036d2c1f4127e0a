"""Stage manifests: the truth about what finished.

A stage directory (iter-000003/scored, a checkpoint, ...) is complete exactly when its
_MANIFEST.json exists. The manifest is written last, atomically, and lists every file of the stage
with its rows, bytes and sha256, the config hash and the inputs the stage was made from. Readers
trust only the manifest: other files in the directory are stray (reported, never read).

    info = write_file_part(fs, stage, "metrics.json", json_bytes)     # non-Parquet stages
    commit_manifest(fs, stage, Manifest(stage="train", config_hash=h, inputs={...}, parts=[info]))
    stage_status(fs, stage)                                           # "done" | "partial" | "missing"
"""
from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone
from typing import Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from storage.errors import ManifestError
from storage.fs import (TMP_SUFFIX, exists, list_dir, read_bytes, sha256_hex, size, write_bytes_atomic,
                        write_json_atomic)

SCHEMA_VERSION = 1
MANIFEST_NAME = "_MANIFEST.json"
Status = Literal["done", "partial", "missing"]


class PartInfo(BaseModel):
    """One committed file of a stage. `name` is relative to the stage directory (may hold '/')."""
    model_config = ConfigDict(extra="forbid")
    name: str
    rows: int | None = Field(None, ge=0, description="rows of a Parquet part; None for other files")
    bytes: int = Field(ge=0)
    sha256: str | None = Field(None, description="hex sha256 of the file; None: size-checked only")

    @field_validator("name")
    @classmethod
    def _relative(cls, v: str) -> str:
        segs = v.split("/")
        if not v or v.startswith("/") or "\\" in v or any(s in ("", ".", "..") for s in segs):
            raise ValueError(f"part name {v!r} must be a relative path inside the stage directory")
        return v


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    stage: str
    config_hash: str | None = None
    inputs: dict[str, Any] = Field(default_factory=dict, description="what the stage was made from")
    parts: list[PartInfo] = Field(default_factory=list)
    extra: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=_now)

    @property
    def rows(self) -> int:
        return sum(p.rows or 0 for p in self.parts)

    def part(self, name: str) -> PartInfo:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(name)


def manifest_path(stage_dir: str) -> str:
    return posixpath.join(stage_dir, MANIFEST_NAME)


def write_file_part(fs: fsspec.AbstractFileSystem, stage_dir: str, name: str, data: bytes,
                    rows: int | None = None) -> PartInfo:
    """Commit one file of a stage atomically and describe it for the manifest."""
    info = PartInfo(name=name, rows=rows, bytes=len(data), sha256=sha256_hex(data))
    write_bytes_atomic(fs, posixpath.join(stage_dir, name), data)
    return info


def write_json_part(fs: fsspec.AbstractFileSystem, stage_dir: str, name: str, obj: Any) -> PartInfo:
    """A JSON file (e.g. train/metrics.json) as a stage part; NaN/inf are refused."""
    try:
        text = json.dumps(obj, indent=2, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ManifestError(f"{posixpath.join(stage_dir, name)}: cannot write as JSON ({err})") from None
    return write_file_part(fs, stage_dir, name, (text + "\n").encode())


def describe_file(fs: fsspec.AbstractFileSystem, stage_dir: str, name: str, checksum: bool = True,
                  rows: int | None = None) -> PartInfo:
    """PartInfo of a file already committed (e.g. written by torch DCP). checksum=False: size only."""
    path = posixpath.join(stage_dir, name)
    if not exists(fs, path):
        raise ManifestError(f"{path}: file listed for the manifest does not exist")
    if checksum:
        data = read_bytes(fs, path)
        return PartInfo(name=name, rows=rows, bytes=len(data), sha256=sha256_hex(data))
    return PartInfo(name=name, rows=rows, bytes=size(fs, path))


def commit_manifest(fs: fsspec.AbstractFileSystem, stage_dir: str, manifest: Manifest) -> str:
    """Write the manifest last, atomically, after checking every listed part exists with its size.
    Returns the manifest's path. From this moment the stage is done."""
    names = [p.name for p in manifest.parts]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ManifestError(f"{stage_dir}: manifest lists parts twice: {dup}")
    for p in manifest.parts:
        path = posixpath.join(stage_dir, p.name)
        if not exists(fs, path):
            raise ManifestError(f"{path}: part listed in the manifest was never written; write it before "
                                f"committing the manifest")
        n = size(fs, path)
        if n != p.bytes:
            raise ManifestError(f"{path}: {n} bytes on storage but {p.bytes} in the manifest entry")
    path = manifest_path(stage_dir)
    write_json_atomic(fs, path, manifest.model_dump(mode="json"))
    return path


def read_manifest(fs: fsspec.AbstractFileSystem, stage_dir: str, verify: bool = False) -> Manifest | None:
    """The stage's manifest, or None when the stage is not complete. verify=True also checks every
    part's size and sha256 (reads every byte). ManifestError names the file and what is wrong."""
    path = manifest_path(stage_dir)
    if not exists(fs, path):
        return None
    try:
        raw = json.loads(read_bytes(fs, path))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); delete it to redo the stage") from None
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ManifestError(f"{path}: schema_version {version} is newer than this opd reads "
                            f"({SCHEMA_VERSION}); upgrade opd")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise ManifestError(f"{path}: not a valid stage manifest ({err.error_count()} errors, first: "
                            f"{'.'.join(map(str, first['loc']))}: {first['msg']}); delete it to redo the "
                            f"stage") from None
    if verify:
        for p in manifest.parts:
            read_part_verified(fs, stage_dir, p)
    return manifest


def read_part_verified(fs: fsspec.AbstractFileSystem, stage_dir: str, part: PartInfo) -> bytes:
    """The bytes of a listed part after checking size and sha256 against the manifest."""
    path = posixpath.join(stage_dir, part.name)
    try:
        data = read_bytes(fs, path)
    except FileNotFoundError:
        raise ManifestError(f"{path}: listed in {MANIFEST_NAME} but missing; the stage is damaged, delete "
                            f"its {MANIFEST_NAME} to redo it") from None
    if len(data) != part.bytes:
        raise ManifestError(f"{path}: {len(data)} bytes but the manifest says {part.bytes} (truncated or "
                            f"overwritten); delete the stage's {MANIFEST_NAME} to redo it")
    if part.sha256 is not None and sha256_hex(data) != part.sha256:
        raise ManifestError(f"{path}: sha256 does not match the manifest (file changed or corrupt); delete "
                            f"the stage's {MANIFEST_NAME} to redo it")
    return data


def stage_files(fs: fsspec.AbstractFileSystem, stage_dir: str) -> list[str]:
    """Every file under the stage directory, as names relative to it, sorted."""
    out: list[str] = []

    def walk(path: str, prefix: str) -> None:
        for e in list_dir(fs, path):
            rel = prefix + e["basename"]
            if e.get("type") == "directory":
                walk(e["name"].rstrip("/"), rel + "/")
            else:
                out.append(rel)

    walk(stage_dir, "")
    return sorted(out)


def stage_status(fs: fsspec.AbstractFileSystem, stage_dir: str) -> Status:
    """done: the manifest exists; partial: some file but no manifest; missing: nothing."""
    if exists(fs, manifest_path(stage_dir)):
        return "done"
    return "partial" if stage_files(fs, stage_dir) else "missing"


def stray_files(fs: fsspec.AbstractFileSystem, stage_dir: str) -> list[str]:
    """Files a reader ignores. With a manifest: every file it does not list. Without one: the
    temporary files of interrupted writes (*.tmp); committed parts are kept for resuming."""
    files = stage_files(fs, stage_dir)
    manifest = read_manifest(fs, stage_dir)
    if manifest is None:
        return [f for f in files if f.endswith(TMP_SUFFIX)]
    listed = {p.name for p in manifest.parts} | {MANIFEST_NAME}
    return [f for f in files if f not in listed]


def remove_tmp_files(fs: fsspec.AbstractFileSystem, stage_dir: str) -> list[str]:
    """Delete temporary files left by interrupted writes (call before resuming a stage)."""
    tmp = [f for f in stage_files(fs, stage_dir) if f.endswith(TMP_SUFFIX)]
    for f in tmp:
        fs.rm_file(posixpath.join(stage_dir, f))
    return tmp
