"""One writer per run directory: a lease under RUN/_lock/, on local disk and object stores alike.

    lease = acquire_lease(layout, flow_run="3f2c...")   # RunLockedError naming the holder when held
    ...                                                  # a daemon thread renews it every ttl/3
    lease.check()                                        # RunLockedError when another process took it
    lease.release()

RUN/_lock/lease-000001.json, lease-000002.json, ... are each written once, create-only (local disk:
a hard link of a finished temporary, which fails when the name exists; S3: a conditional PUT,
If-None-Match: *; memory://: exclusive create). The newest is the current lease: {host, pid,
pid_start, flow_run, token, acquired_at, expires_at, released}. It is free when released, expired
(its holder stopped renewing: killed, even by SIGKILL, or cut off) or held by a process of this host
that no longer runs. Taking it is writing the next number: of two racers exactly one succeeds, the
other then sees the winner's lease and is refused. The holder renews by rewriting its own file
with a later expires_at; a renewal that finds a newer lease stops and marks the lease lost.
Expiry compares the holder's clock with the reader's: keep hosts NTP-synced (skew << ttl).
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from storage.errors import OpdError
from storage.fs import exists, is_local, list_dir, read_bytes, tmp_name, url_of, write_json_atomic
from storage.layout import RunLayout

LOCK_DIR = "_lock"
LEASE_RE = re.compile(r"^lease-(\d{6})\.json$")
TTL_S = float(os.environ.get("OPD_LOCK_TTL_S", "120"))


class RunLockedError(OpdError):
    """The run directory is being written by another opd process (or this one lost its lease)."""


def _pid_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _pid_start(pid) in (None, start)


def _create_only(fs, path: str, data: bytes) -> bool:
    """Write `path` only if it does not exist; False when it does (another writer won)."""
    if is_local(fs):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tmp_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if the name exists; readers never see a half lease
            return True
        except FileExistsError:
            return False
        finally:
            os.remove(tmp)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except OSError as err:  # S3's 412 Precondition Failed, as s3fs translates it
        if "precondition" in str(err).lower() or "PreconditionFailed" in repr(err):
            return False
        raise


@dataclass
class Lease:
    layout: RunLayout
    number: int
    info: dict
    ttl: float = TTL_S
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return lease_path(self.layout, self.number)

    def _write(self, **update) -> None:
        if newest(self.layout)[0] != self.number:
            self.lost = True
            return
        self.info.update(update)
        write_json_atomic(self.layout.fs, self.path, self.info)

    def renew(self) -> None:
        self._write(expires_at=time.time() + self.ttl)

    def check(self) -> None:
        """RunLockedError when another process has taken this run directory over."""
        if self.lost or newest(self.layout)[0] != self.number:
            self.lost = True
            raise RunLockedError(f"{self.layout.url}: this process lost its lease ({self.path}) to another opd: it "
                                 f"stopped renewing for {self.ttl:.0f} s or the lock was removed; stop here, see "
                                 f"`opd status {self.layout.url}`, and resume from one process only")

    def start_renewing(self) -> None:
        def loop():
            while not self._stop.wait(self.ttl / 3):
                try:
                    self.renew()
                except Exception:  # noqa: BLE001 - a failed renewal is retried next period
                    pass
                if self.lost:
                    return
        self._thread = threading.Thread(target=loop, name="opd-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost:
            self._write(released=True, released_at=time.time())

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except Exception:  # noqa: BLE001 - the error that stopped the run matters more; the lease expires
            if exc_type is None:
                raise


def lease_path(layout: RunLayout, number: int) -> str:
    return layout.join(LOCK_DIR, f"lease-{number:06d}.json")


def newest(layout: RunLayout) -> tuple[int, dict | None]:
    """(number, content) of the current lease; (0, None) when there is none."""
    numbers = [int(m.group(1)) for e in list_dir(layout.fs, layout.join(LOCK_DIR))
               if (m := LEASE_RE.match(e["basename"]))]
    if not numbers:
        return 0, None
    n = max(numbers)
    try:
        return n, json.loads(read_bytes(layout.fs, lease_path(layout, n)))
    except (FileNotFoundError, ValueError):
        return n, {}  # damaged (a lease is written whole, never half): treated as expired


def why_free(info: dict | None, now: float | None = None) -> str | None:
    """Why the lease `info` no longer holds the run ("released", "expired", "holder gone"), or None."""
    now = time.time() if now is None else now
    if info is None:
        return "none"
    if info.get("released"):
        return "released"
    if float(info.get("expires_at", 0)) < now:
        return "expired"
    if info.get("host") == socket.gethostname() and not _alive(int(info.get("pid", -1)), info.get("pid_start")):
        return "holder gone"
    return None


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(t))) if t else "?"


def holder_message(layout: RunLayout, number: int, info: dict) -> str:
    lock = url_of(layout.fs, layout.join(LOCK_DIR))
    return (f"{layout.url}: another opd is writing this run: pid {info.get('pid', '?')} on host "
            f"{info.get('host', '?')}, flow run {info.get('flow_run') or '-'}, since {_when(info.get('acquired_at'))}, "
            f"lease renewed until {_when(info.get('expires_at'))}. Wait for it to finish (`opd status {layout.url}`); "
            f"if that process is gone, its lease expires then and `opd resume {layout.url}` proceeds (to take over "
            f"at once, delete {lock}/lease-{number:06d}.json)")


def acquire_lease(layout: RunLayout, flow_run: str | None = None, ttl: float = TTL_S, renew: bool = True) -> Lease:
    """Take the run directory's lease or raise RunLockedError naming its holder."""
    for _ in range(5):  # lost races: re-read and try again
        number, info = newest(layout)
        if number and why_free(info) is None:
            raise RunLockedError(holder_message(layout, number, info or {}))
        now = time.time()
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "flow_run": flow_run, "token": uuid.uuid4().hex, "acquired_at": now, "expires_at": now + ttl,
                "released": False, "previous": {"number": number, "freed": why_free(info)} if number else None}
        if _create_only(layout.fs, lease_path(layout, number + 1), json.dumps(mine, indent=2).encode()):
            lease = Lease(layout, number + 1, mine, ttl)
            _forget_old(layout, number + 1)
            if renew:
                lease.start_renewing()
            return lease
    raise RunLockedError(f"{layout.url}: could not take the run's lease: other processes keep taking it; run one "
                         f"opd per run directory")


def _forget_old(layout: RunLayout, keep: int) -> None:
    """Remove leases older than the previous one (best effort; the newest two stay)."""
    for e in list_dir(layout.fs, layout.join(LOCK_DIR)):
        m = LEASE_RE.match(e["basename"])
        if m and int(m.group(1)) < keep - 1:
            try:
                layout.fs.rm_file(posixpath.join(layout.join(LOCK_DIR), e["basename"]))
            except OSError:
                pass


def is_held(layout: RunLayout) -> bool:
    if not exists(layout.fs, layout.join(LOCK_DIR)):
        return False
    number, info = newest(layout)
    return bool(number) and why_free(info) is None
