"""The run directory: where every file of a run lives (any fsspec URL: local, s3://, memory://).

    RUN/
      run.yaml                          the resolved config, written once
      metrics.jsonl                     one line per iteration
      iter-000003/{rollout,scored,train,eval}/   parts + _MANIFEST.json (written last)
      offline/{rollout,scored,filter,train,evaluation}/  the offline phase (warm start before iteration 0)
      checkpoints/iter-000003/          state after training iteration 3 (storage/checkpoints.py)
      checkpoints/offline/              state after the offline phase (iteration 0's student)

    layout = RunLayout("s3://bucket/runs/demo", {"key": ..., "secret": ...})
    layout.stage_dir(3, "scored")       # "bucket/runs/demo/iter-000003/scored" (a path in layout.fs)

Every path comes from `join`, which refuses anything that would leave the run root.
"""
from __future__ import annotations

import posixpath
import re

import fsspec

from storage.errors import LayoutError
from storage.fs import (append_jsonl, filesystem, is_local, list_dir, read_json, read_jsonl,  # noqa: F401
                        write_bytes_atomic, write_json_atomic, write_text_atomic)

STAGES = ("rollout", "scored", "train", "eval")
OFFLINE_STAGES = ("rollout", "scored", "filter", "train", "evaluation")
OFFLINE = "offline"
OFFLINE_ITERATION = -1  # the offline phase's "iteration": its shards' iteration column, the trainer's argument
ITER_RE = re.compile(r"^iter-(\d{6})$")
_RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_run_name(name: str) -> str:
    """A run name is one path segment: letters, digits, '.', '_', '-' (starting with a letter or digit)."""
    if not isinstance(name, str) or not _RUN_NAME_RE.match(name) or ".." in name:
        raise LayoutError(f"run name {name!r} is not allowed: use 1-128 letters, digits, '.', '_' or '-', "
                          f"starting with a letter or digit, without '..' (e.g. 'toy-rkl-01')")
    return name


def iteration_name(n: int) -> str:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0 or n > 999_999:
        raise LayoutError(f"iteration {n!r} is not allowed: use an integer in 0..999999")
    return f"iter-{n:06d}"


class RunLayout:
    """Paths of one run. `root` and every returned path are paths inside `fs` (no protocol), ready
    for fs.open / fs.ls and for the storage functions that take (fs, path)."""

    def __init__(self, root: str, storage_options: dict | None = None, fs: fsspec.AbstractFileSystem | None = None):
        if fs is None:
            fs, path = filesystem(root, storage_options)
        else:
            path = str(fs._strip_protocol(str(root))).rstrip("/")
        if not path or path in ("/", "."):
            raise LayoutError(f"run root {root!r} is the filesystem root; give a directory for the run")
        self.fs = fs
        self.root = path
        self.url = self.url_of(path)
        self.storage_options = dict(storage_options or {})

    def __repr__(self) -> str:
        return f"RunLayout({self.root!r}, fs={type(self.fs).__name__})"

    def join(self, *parts: str) -> str:
        """root/part/part...; LayoutError when a part is empty, absolute, a URL or contains '..'."""
        segs: list[str] = []
        for part in parts:
            if not isinstance(part, str) or not part or "\\" in part or "\0" in part or "://" in part \
                    or part.startswith("/"):
                raise LayoutError(f"path part {part!r} under run {self.root!r} is not allowed: use a relative "
                                  f"path without '\\', '://' or a leading '/'")
            for seg in part.split("/"):
                if seg in ("", ".", ".."):
                    raise LayoutError(f"path {'/'.join(parts)!r} would leave the run root {self.root!r} "
                                      f"(segments '', '.', '..' are not allowed)")
                segs.append(seg)
        return posixpath.join(self.root, *segs)

    def url_of(self, path: str) -> str:
        """A URL for a path of this layout (plain path on local disk), e.g. to hand to another process."""
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    @property
    def run_yaml(self) -> str:
        return self.join("run.yaml")

    @property
    def metrics_jsonl(self) -> str:
        return self.join("metrics.jsonl")

    def iteration_dir(self, n: int) -> str:
        return self.join(iteration_name(n))

    def stage_dir(self, n: int, stage: str) -> str:
        if stage not in STAGES:
            raise LayoutError(f"stage {stage!r} is unknown; use one of {STAGES}")
        return self.join(iteration_name(n), stage)

    def inspect_html(self, n: int) -> str:
        """Iteration n's scored stage as one HTML page (`opd inspect --html`), written by `opd run`."""
        return self.join(iteration_name(n), "inspect.html")

    def offline_dir(self, stage: str) -> str:
        if stage not in OFFLINE_STAGES:
            raise LayoutError(f"offline stage {stage!r} is unknown; use one of {OFFLINE_STAGES}")
        return self.join("offline", stage)

    @property
    def checkpoints_dir(self) -> str:
        return self.join("checkpoints")

    def checkpoint_dir(self, n: int) -> str:
        """The checkpoint AFTER training iteration n (the student of iteration n+1's rollout)."""
        return self.join("checkpoints", iteration_name(n))

    def offline_checkpoint_dir(self) -> str:
        """The checkpoint after the offline phase: the student of iteration 0 when one is configured."""
        return self.join("checkpoints", OFFLINE)

    def iterations(self) -> list[int]:
        """Iterations that have a directory (any state), ascending."""
        return _numbered_dirs(self.fs, self.root)

    def checkpoint_iterations(self) -> list[int]:
        """Iterations that have a checkpoint directory (complete or not), ascending."""
        return _numbered_dirs(self.fs, self.checkpoints_dir)

    def exists(self) -> bool:
        return bool(list_dir(self.fs, self.root))


def _numbered_dirs(fs: fsspec.AbstractFileSystem, path: str) -> list[int]:
    out = []
    for e in list_dir(fs, path):
        m = ITER_RE.match(e["basename"])
        if m and e.get("type") == "directory":
            out.append(int(m.group(1)))
    return sorted(out)
