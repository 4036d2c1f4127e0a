"""Prefect's temporary API server, started before the rest of an `opd run` process is imported.

    ready = start_temporary_api()   # first thing in `opd run` / `opd resume` / `opd demo`
    from flows.run import run_from_config   # torch, transformers, ...: the server starts meanwhile
    ready()                         # before the first flow call: the server answers /health
    run_from_config(...)            # (while it does not yet, ready() imports the stages' code first)

With no PREFECT_API_URL (and ephemeral mode on, Prefect's default), the first flow call starts
a temporary server itself: it imports Prefect's server app into this process (~5 s of CPU here),
then starts the same app in a subprocess and waits for it (13-20 s on this machine), all
before the run's first line. Here the subprocess starts at once, with Prefect's own command and
environment (prefect.server.api.server.SubprocessASGIServer), and this process goes on importing
and loading while it comes up; PREFECT_API_URL points the process at it, and it is stopped when the
process exits (as Prefect stops its own), or, on Linux, when it is killed (SIGKILL: no atexit). With
PREFECT_API_URL set (a running server, as in production) or ephemeral mode off, nothing is started.
"""
from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Callable

from opd_tasks.errors import OpdError


# What the temporary server skips unless the environment says otherwise. Block types: registering
# every one of them took ~5 s of a fresh database's start here, and a run on a temporary server has
# no block documents to use them; whichever server next starts with registration on (Prefect's
# default) registers them in the same database. Telemetry (Prefect's usage report): its heartbeat
# raced a fresh database's first writes and printed "database is locked" tracebacks on the run's
# terminal. Either is back with PREFECT_API_BLOCKS_REGISTER_ON_START / PREFECT_SERVER_ANALYTICS_ENABLED.
TEMPORARY_DEFAULTS = {"PREFECT_API_BLOCKS_REGISTER_ON_START": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def start_temporary_api() -> Callable[[], None]:
    """Start the server subprocess now when this process would start one; returns the function
    that waits until it answers (a no-op when nothing was started; OpdError, a one-line error of
    the CLI naming the fix, when the server exits or does not answer in time)."""
    import prefect
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return lambda: None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**TEMPORARY_DEFAULTS, **os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", **settings.to_environment_variables(exclude_unset=True)}
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
                             "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    atexit.register(_stop, proc)
    url = f"http://127.0.0.1:{port}/api"
    os.environ["PREFECT_API_URL"] = url  # this process (and its subprocesses) use it from now on
    refresh_global_settings_context()
    timeout = settings.server.ephemeral.startup_timeout_seconds

    def ready() -> None:
        deadline = time.monotonic() + timeout
        if not _answers(url):  # still starting: import what the stages will import, on this idle core
            _import_stage_code()
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise OpdError(f"Prefect's temporary server exited with code {proc.returncode} before it "
                                   f"answered on {url}; run `prefect server start` and set PREFECT_API_URL")
            if _answers(url):
                return
            time.sleep(0.1)
        raise OpdError(f"Prefect's temporary server did not answer on {url} within {timeout} s; raise "
                           f"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set PREFECT_API_URL")
    return ready


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _import_stage_code() -> None:
    """The stages' modules with torch and transformers' auto classes (~6 s of imports here), which
    the first iteration would import anyway, imported while the server starts instead of after."""
    import transformers

    import opd_tasks.engines.hf  # noqa: F401
    import opd_tasks.eval_stage  # noqa: F401
    import opd_tasks.rollout  # noqa: F401
    import opd_tasks.scoring  # noqa: F401
    import opd_tasks.trainer.worker  # noqa: F401
    transformers.AutoTokenizer, transformers.AutoModelForCausalLM  # lazy: these import the classes


def _die_with_parent() -> None:
    """In the server's process before exec: SIGTERM when the thread that started it ends, so a run
    killed with SIGKILL (atexit never runs) leaves no server behind. opd starts the server from the
    main thread, first thing, so that thread is the process's life."""
    import ctypes
    import signal
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
