"""The `opd` entry's quick exit (flows/cli.py _Opd): exit handlers and output kept, the status kept,
the interpreter's teardown skipped, and a non-daemon thread still running waited for."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import atexit, sys, threading, time
atexit.register(lambda: print("exit handler ran", file=sys.stderr))
# how Prefect drains its log and event workers at exit (prefect/_internal/concurrency/services.py)
threading._register_atexit(lambda: print("threading exit hook ran", file=sys.stderr))
class Teardown:
    def __del__(self):
        print("interpreter teardown", file=sys.stderr)
keep = Teardown()  # freed only by the interpreter's teardown
from flows.cli import app
"""


def _opd(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PRELUDE + code], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def test_quick_exit_keeps_output_handlers_and_status_and_skips_the_teardown():
    ok = _opd("sys.argv = ['opd', '--help']; app()")
    assert ok.returncode == 0 and "Usage" in ok.stdout  # a pipe: flushed before os._exit
    assert "exit handler ran" in ok.stderr and "interpreter teardown" not in ok.stderr
    assert ok.stderr.index("threading exit hook ran") < ok.stderr.index("exit handler ran")  # the interpreter's order
    bad = _opd("sys.argv = ['opd', 'status', '/nonexistent/run']; app()")
    assert bad.returncode == 2 and "error: /nonexistent/run" in bad.stderr
    assert "exit handler ran" in bad.stderr and "interpreter teardown" not in bad.stderr


def test_a_running_non_daemon_thread_is_waited_for():
    out = _opd("threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished'))).start()\n"
               "sys.argv = ['opd', '--help']; app()")
    assert out.returncode == 0 and "thread finished" in out.stdout and "exit handler ran" in out.stderr
