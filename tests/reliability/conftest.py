"""The `opd` CLI in subprocesses against one Prefect server for the whole session.

Each `opd` process would otherwise start (and, when SIGKILLed, leave behind) its own temporary
Prefect API server: 15-25 s per process on this machine. One `prefect server start` in its own
PREFECT_HOME and SQLite database on a free 127.0.0.1 port, shared by every CLI run of these tests,
pays that once. Runs are sequential (one client at a time), so SQLite is not contended. The
manifests, not Prefect's database, are what a resume reads, so sharing it changes nothing about
what is tested.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
OPD = [sys.executable, "-m", "flows.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(home: Path) -> dict:
    """The environment of every opd subprocess: one torch thread (the same thread count in every run,
    so float reductions are identical run to run), offline HF, no Prefect analytics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "OPD_FAULT"}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class OpdCli:
    """Runs `python -m flows.cli ARGS` in its own session with the server's env (+ extra env), waits,
    then kills whatever the session left behind. Output goes to numbered log files under log_dir."""

    def __init__(self, env: dict, log_dir: Path):
        self.env, self.log_dir, self.calls = env, log_dir, 0

    def __call__(self, *args: str, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
        self.calls += 1
        log = self.log_dir / f"opd-{self.calls:02d}-{args[0]}.log"
        with open(log, "w") as out:
            p = subprocess.Popen(OPD + list(args), cwd=ROOT, env={**self.env, **extra_env}, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                p.wait(timeout=timeout)
            finally:
                _kill_group(p.pid)
                p.wait()
        return subprocess.CompletedProcess(p.args, p.returncode, log.read_text(errors="replace"), "")


@pytest.fixture(scope="session")
def opd_cli(tmp_path_factory) -> OpdCli:
    """An OpdCli whose runs talk to a `prefect server` started for this session (killed at the end)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = base_env(home)
    log = home / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield OpdCli({**env, "PREFECT_API_URL": url}, tmp_path_factory.mktemp("opd-logs"))
    finally:
        _kill_group(server.pid)
        server.wait()
