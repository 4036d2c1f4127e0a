"""One writer per run directory (storage/lock.py) on local disk, memory:// and S3 (moto): a second
writer is refused naming the holder; a released, expired or SIGKILLed holder's lease is taken over;
of racers exactly one wins; a holder whose lease was taken notices."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from storage.layout import RunLayout
from storage.lock import RunLockedError, acquire_lease, is_held, lease_path, newest

ROOT = Path(__file__).resolve().parents[2]


def test_second_writer_is_refused_naming_the_holder_then_proceeds_after_release(layout):
    first = acquire_lease(layout, flow_run="flow-run-1", ttl=60)
    assert is_held(layout)
    with pytest.raises(RunLockedError) as err:
        acquire_lease(layout, flow_run="flow-run-2")
    msg = str(err.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, flow run flow-run-1" in msg
    assert "Wait for it to finish" in msg and f"opd resume {layout.url}" in msg and "lease-000001.json" in msg
    first.check()  # still ours
    first.release()
    assert not is_held(layout)
    with acquire_lease(layout, flow_run="flow-run-2") as second:
        assert second.number == 2 and second.info["previous"] == {"number": 1, "freed": "released"}
    assert not is_held(layout)


def test_an_expired_lease_of_another_host_is_taken_over_and_its_holder_notices(layout):
    stale = acquire_lease(layout, flow_run="elsewhere", ttl=60, renew=False)
    info = {**stale.info, "host": "other-host", "expires_at": time.time() - 1}  # stopped renewing
    layout.fs.pipe_file(lease_path(layout, 1), json.dumps(info).encode())
    taken = acquire_lease(layout, renew=False)
    assert taken.number == 2 and taken.info["previous"]["freed"] == "expired"
    with pytest.raises(RunLockedError, match="this process lost its lease"):
        stale.check()
    stale.renew()  # a renewal after the takeover writes nothing
    assert json.loads(layout.fs.cat_file(lease_path(layout, 1)))["host"] == "other-host" and stale.lost
    live = {**info, "expires_at": time.time() + 60}  # another host's live lease: no liveness check possible
    taken.release()
    layout.fs.pipe_file(lease_path(layout, 3), json.dumps(live).encode())
    with pytest.raises(RunLockedError, match="on host other-host"):
        acquire_lease(layout)


def test_racing_writers_exactly_one_wins(layout):
    results: list = []

    def take():
        try:
            results.append(acquire_lease(layout, renew=False))
        except RunLockedError as err:
            results.append(err)
    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [r for r in results if not isinstance(r, Exception)]
    assert len(won) == 1 and newest(layout)[0] == won[0].number == 1


def test_renewal_moves_the_expiry(tmp_path):
    lay = RunLayout(str(tmp_path / "run"))
    lease = acquire_lease(lay, ttl=0.6)
    first = lease.info["expires_at"]
    time.sleep(0.5)  # renewed every ttl/3
    assert newest(lay)[1]["expires_at"] > first
    lease.release()
    assert newest(lay)[1]["released"]


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_sigkilled_holder_does_not_block_the_next_writer(backend, tmp_path, request):
    """The holder is a real process killed with SIGKILL: its lease (ttl 1 h) is never released, yet
    the next writer on this host sees its pid gone and takes over at once."""
    if backend == "local":
        url, opts = str(tmp_path / "run"), None
    else:
        bucket, opts = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/run"
    code = textwrap.dedent(f"""
        import json, sys, time
        from storage.layout import RunLayout
        from storage.lock import acquire_lease
        lease = acquire_lease(RunLayout({url!r}, json.loads({json.dumps(json.dumps(opts))})), flow_run="doomed",
                              ttl=3600)
        print("held", flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        lay = RunLayout(url, opts)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} .*flow run doomed"):
            acquire_lease(lay)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        with acquire_lease(lay, renew=False) as lease:
            assert lease.info["previous"] == {"number": 1, "freed": "holder gone"}
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_a_failing_release_does_not_hide_the_error_that_stopped_the_run(tmp_path, monkeypatch):
    from storage.errors import StorageError
    from storage.lock import Lease

    def down(self):
        raise StorageError("the store is down")
    monkeypatch.setattr(Lease, "release", down)
    lay = RunLayout(str(tmp_path / "run"))
    with pytest.raises(ValueError, match="the run's own error"):
        with acquire_lease(lay, renew=False):
            raise ValueError("the run's own error")
    with pytest.raises(StorageError, match="the store is down"):  # with nothing else to report, it is reported
        with acquire_lease(RunLayout(str(tmp_path / "other")), renew=False):
            pass
