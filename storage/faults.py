"""Fault injection for the reliability tests: a real SIGKILL at a named point, and a filesystem that
fails a chosen fraction of its calls.

    OPD_FAULT=scored.part:2 opd run ...   # killed right after the 2nd scored part is committed

Points: rollout.part, scored.part (after a part is committed), train.step (after an optimizer
step, before the checkpoint is committed), eval (before the eval manifest), manifest (a manifest's
temporary file is written but not yet renamed). Unset, this costs one dict lookup.

    opdfault:///PATH      PATH on memory:// (default) or the local disk, through FaultFileSystem
    with inject(FaultPlan(rate=0.1, ops={"read", "list"}, seed=3)): ...   # this process
    OPD_FS_FAULTS="rate=0.1,ops=read+list,seed=3,error=eio,target=file" opd run ...   # a CLI process

A plan fails each call of the chosen kinds (read, list, write, delete) with probability `rate`
(seeded: the same plan fails the same calls), after letting `after` calls through, at most
`limit` times. Errors: eio (OSError EIO), denied (PermissionError: S3's 403 or throttling as
s3fs raises it), timeout, enospc (no space left), erofs (read-only). Writes are all or nothing,
as on an object store: a failed write stores nothing.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import fsspec
from fsspec.spec import AbstractFileSystem

_seen: Counter = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get("OPD_FAULT")
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


OPS = ("read", "list", "write", "delete")
ERRORS = {
    "eio": lambda p: OSError(errno.EIO, "injected I/O error", p),
    "denied": lambda p: PermissionError(errno.EACCES, "injected Access Denied (throttled)", p),
    "timeout": lambda p: TimeoutError(errno.ETIMEDOUT, "injected timeout", p),
    "enospc": lambda p: OSError(errno.ENOSPC, "No space left on device (injected)", p),
    "erofs": lambda p: OSError(errno.EROFS, "Read-only file system (injected)", p),
}


@dataclass
class FaultPlan:
    rate: float = 0.0
    ops: frozenset = frozenset(OPS)
    error: str = "eio"
    seed: int = 0
    after: int = 0              # calls (of the chosen kinds) let through first
    limit: int | None = None    # at most this many failures
    target: str = "memory"      # memory or file
    calls: int = field(default=0, init=False)
    failures: Counter = field(default_factory=Counter, init=False)   # injected, by kind
    seen: Counter = field(default_factory=Counter, init=False)       # every call, by kind

    def __post_init__(self):
        self.ops = frozenset(self.ops)
        if not self.ops <= set(OPS) or self.error not in ERRORS or self.target not in ("memory", "file"):
            raise ValueError(f"bad fault plan {self}: ops from {OPS}, error from {sorted(ERRORS)}, target memory|file")
        self._rng, self._lock = random.Random(self.seed), threading.Lock()

    @classmethod
    def parse(cls, text: str) -> "FaultPlan":
        """From "rate=0.1,ops=read+list,seed=3,error=eio,after=0,limit=5,target=file"."""
        kw = dict(item.split("=", 1) for item in text.split(",") if item.strip())
        conv = {"rate": float, "seed": int, "after": int, "limit": int, "ops": lambda v: frozenset(v.split("+"))}
        return cls(**{k: conv.get(k, str)(v) for k, v in kw.items()})

    def check(self, op: str, path: str) -> None:
        """Raise this plan's error for this call, or return."""
        with self._lock:
            self.seen[op] += 1
        if op not in self.ops:
            return
        with self._lock:
            self.calls += 1
            fail = self.calls > self.after and self._rng.random() < self.rate and \
                (self.limit is None or sum(self.failures.values()) < self.limit)
            if fail:
                self.failures[op] += 1
        if fail:
            raise ERRORS[self.error](path)


_plan: FaultPlan | None = None


def current_plan() -> FaultPlan:
    global _plan
    if _plan is None:
        _plan = FaultPlan.parse(os.environ.get("OPD_FS_FAULTS", ""))
    return _plan


@contextmanager
def inject(plan: FaultPlan):
    """Use `plan` for every opdfault:// call of this process inside the block; no faults afterwards."""
    global _plan
    old, _plan = _plan, plan
    try:
        yield plan
    finally:
        _plan = old


class FaultFileSystem(AbstractFileSystem):
    """opdfault://PATH: PATH on the plan's target filesystem, failing the calls the plan picks."""
    protocol = "opdfault"
    root_marker = "/"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        path = path[len("opdfault://"):] if path.startswith("opdfault://") else path
        return "/" + path.lstrip("/") if path else "/"

    @property
    def target(self) -> AbstractFileSystem:
        return fsspec.filesystem(current_plan().target)

    def _fault(self, op: str, path) -> None:
        current_plan().check(op, str(path))

    def unstrip_protocol(self, name: str) -> str:
        return "opdfault://" + self._strip_protocol(name)

    # reads
    def info(self, path, **kw):
        self._fault("read", path)
        return {**self.target.info(self._strip_protocol(path), **kw)}

    def cat_file(self, path, start=None, end=None, **kw):
        self._fault("read", path)
        return self.target.cat_file(self._strip_protocol(path), start=start, end=end, **kw)

    def ls(self, path, detail=True, **kw):
        self._fault("list", path)
        return self.target.ls(self._strip_protocol(path), detail=detail, **kw)

    def _open(self, path, mode="rb", **kw):
        self._fault("read" if "r" in mode else "write", path)
        return self.target.open(self._strip_protocol(path), mode, **kw)

    # writes
    def pipe_file(self, path, value, mode="overwrite", **kw):
        self._fault("write", path)
        self.target.makedirs(self.target._parent(self._strip_protocol(path)), exist_ok=True)
        return self.target.pipe_file(self._strip_protocol(path), value, mode=mode, **kw)

    def mkdir(self, path, create_parents=True, **kw):
        self._fault("write", path)
        return self.target.makedirs(self._strip_protocol(path), exist_ok=True)

    def makedirs(self, path, exist_ok=False):
        self._fault("write", path)
        return self.target.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def cp_file(self, path1, path2, **kw):
        self._fault("write", path2)
        return self.target.cp_file(self._strip_protocol(path1), self._strip_protocol(path2), **kw)

    def mv(self, path1, path2, recursive=False, maxdepth=None, **kw):
        self._fault("write", path2)
        return self.target.mv(self._strip_protocol(path1), self._strip_protocol(path2), recursive=recursive,
                              maxdepth=maxdepth, **kw)

    # deletes
    def rm_file(self, path):
        self._fault("delete", path)
        return self.target.rm_file(self._strip_protocol(path))

    def rmdir(self, path):
        self._fault("delete", path)
        return self.target.rmdir(self._strip_protocol(path))

    def rm(self, path, recursive=False, maxdepth=None):
        self._fault("delete", path)
        paths = [path] if isinstance(path, str) else path
        return self.target.rm([self._strip_protocol(p) for p in paths], recursive=recursive, maxdepth=maxdepth)

    def invalidate_cache(self, path=None):
        self.target.invalidate_cache(None if path is None else self._strip_protocol(path))


fsspec.register_implementation("opdfault", FaultFileSystem, clobber=True)
