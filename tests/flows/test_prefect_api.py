"""flows/prefect_api.py: `opd run` starts Prefect's temporary server before its imports, uses it
for its flows without importing Prefect's server app, and stops it at exit; with PREFECT_API_URL
set nothing is started."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_nothing_is_started_when_an_api_url_is_set(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.prefect_api as api

    def no_popen(*a, **kw):
        raise AssertionError("a server was started although PREFECT_API_URL is set")

    monkeypatch.setattr(api.subprocess, "Popen", no_popen)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        ready = api.start_temporary_api()
    ready()  # a no-op
    assert "PREFECT_API_URL" not in os.environ


def test_a_server_that_exits_is_a_one_line_error_naming_the_fix(tmp_path):
    # In a fresh process: this one's Prefect settings may hold another test's API url (the test
    # harness), and then nothing would be started.
    script = textwrap.dedent("""
        import flows.prefect_api as api
        from opd_tasks.errors import OpdError

        class Exited:  # a server process that died at once (a broken Prefect install, a bad database)
            returncode = 3

            def poll(self):
                return self.returncode

        api.subprocess.Popen = lambda *a, **kw: Exited()
        api.atexit.register = lambda *a: None
        ready = api.start_temporary_api()
        try:
            ready()
        except OpdError as e:
            print("ERROR", e)
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    env.pop("PREFECT_API_URL", None)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR ") and "exited with code 3" in line and "set PREFECT_API_URL" in line, p.stdout


@pytest.mark.slow  # a real temporary server: 10-30 s on this machine
def test_the_early_server_runs_the_flows_and_stops_at_exit(tmp_path):
    script = textwrap.dedent("""
        import json, os, sys
        from flows.prefect_api import start_temporary_api
        ready = start_temporary_api()
        url = os.environ["PREFECT_API_URL"]
        from prefect import flow
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_API_URL

        @flow
        def probe():
            return flow_run.id, PREFECT_API_URL.value()

        ready()
        run_id, seen = probe()
        from prefect.client.orchestration import get_client
        with get_client(sync_client=True) as client:
            block_types = len(client.read_block_types())
        print(json.dumps({"url": url, "seen": seen, "run_id": run_id, "block_types": block_types,
                          "stage_code_imported": "opd_tasks.trainer.worker" in sys.modules,
                          "server_in_process": "prefect.server.api.server" in sys.modules}))
    """)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(ROOT)}
    for name in ("PREFECT_API_URL", "PREFECT_API_BLOCKS_REGISTER_ON_START", "PREFECT_SERVER_ANALYTICS_ENABLED"):
        env.pop(name, None)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["seen"] == out["url"] and out["run_id"]  # the flow ran against the server started early
    assert not out["server_in_process"]  # Prefect's server app was not imported into the run's process
    # a fresh database: no block types registered (~5 s), no telemetry racing its first writes
    assert out["block_types"] == 0 and "database is locked" not in p.stderr
    assert out["stage_code_imported"]  # imported while the server started (a fresh database: it takes seconds)
    port = int(out["url"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as sock:  # stopped at exit: nothing listens on its port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0

    # a run killed with SIGKILL (no atexit) leaves no server behind either
    killed = textwrap.dedent("""
        import os, signal
        from flows.prefect_api import start_temporary_api
        ready = start_temporary_api()
        ready()
        print(os.environ["PREFECT_API_URL"], flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", killed], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-3000:]
    port = int(p.stdout.strip().splitlines()[-1].rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the server of a SIGKILLed run still listens on port {port}")
