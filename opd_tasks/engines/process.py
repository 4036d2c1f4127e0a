"""An engine in its own process: started on its own devices, driven over a local socket, ended to
free its memory.

    rep = EngineProcess("vllm", "/ckpt/hf", {"dtype": "bfloat16", "tensor_parallel_size": 2},
                        gpus=[2, 3], name="teacher math replica 0/1", run_dir=run_dir)
    rep.submit("generate", prompt_ids, 4, sampling); samples = rep.result()   # or rep.call(...)
    rep.close()                                   # ends the process group (releases its memory)

The child (`python -m opd_tasks.engines.replica`, with the interpreter OPD_ENGINE_PYTHON when set: vLLM
may live in its own virtualenv, apart from the flow's Prefect) runs in its own session, so tearing down its
process group also ends what the engine started (vLLM workers). CUDA_VISIBLE_DEVICES is set to the
replica's GPUs (see visible_devices; on CPU the ids are slots for the lifecycle rules only). A
replica that dies is an EngineProcessError naming it, its pid and its log's tail;
every stage writes parts atomically, so `opd resume` continues once the cause is fixed.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

from opd_tasks.engines.lifecycle import register_process, unregister_process
from opd_tasks.errors import OpdError

START_TIMEOUT = float(os.environ.get("OPD_ENGINE_START_TIMEOUT", "900"))


class EngineProcessError(OpdError):
    """An engine process failed to start, died, or raised; the message names it and its pid."""


def visible_devices(gpus: list[int]) -> str:
    """CUDA_VISIBLE_DEVICES for placement ids: indices into the parent's own CUDA_VISIBLE_DEVICES when
    it has one (opd on GPUs 4-7: placement id 0 is GPU 4), else the ids themselves. Harmless on CPU."""
    parent = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if parent:
        if max(gpus) >= len(parent):
            raise EngineProcessError(f"placement names GPU {max(gpus)}, but CUDA_VISIBLE_DEVICES="
                                     f"{','.join(parent)} has {len(parent)}; fix the placement or the variable")
        return ",".join(parent[g] for g in gpus)
    return ",".join(str(g) for g in gpus)


class EngineProcess:
    """A Generator/Scorer whose engine (make_generator(kind, path, **opts)) lives in a child process."""

    def __init__(self, kind: str, model_path: str, opts: dict[str, Any], gpus: list[int] | None = None,
                 name: str = "engine", run_dir: str | None = None, log_dir: str | None = None,
                 scorer: bool = False):
        self.name, self.kind, self.model_path, self.gpus = name, kind, model_path, list(gpus or [])
        self._pending = False
        authkey = secrets.token_bytes(16)
        sock_dir = tempfile.mkdtemp(prefix="opd-engine-")
        self._listener = Listener(os.path.join(sock_dir, "s"), family="AF_UNIX", authkey=authkey)
        env = dict(os.environ, OPD_ENGINE_AUTHKEY=authkey.hex(), PYTHONUNBUFFERED="1")
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = visible_devices(self.gpus)
        log_dir = Path(log_dir or sock_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / (name.replace(" ", "-").replace("/", "of") + ".log")
        self._log = open(self.log_path, "ab")
        spec = json.dumps({"kind": kind, "model_path": model_path, "opts": opts, "name": name,
                           "scorer": scorer})
        python = os.environ.get("OPD_ENGINE_PYTHON") or sys.executable
        self.proc = subprocess.Popen([python, "-m", "opd_tasks.engines.replica", self._listener.address, spec],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pid = self.proc.pid
        register_process(self.pid, run_dir, name)
        self.conn = None
        try:
            self.conn = self._accept()
            self._reply("start")  # ("ready", info) once the engine is built
        except BaseException:
            self.close()
            raise

    def _accept(self):
        box: dict = {}
        t = threading.Thread(target=lambda: box.setdefault("c", self._listener.accept()), daemon=True)
        t.start()
        deadline = time.monotonic() + START_TIMEOUT
        while t.is_alive():
            t.join(0.2)
            if self.proc.poll() is not None and t.is_alive():
                raise self._died("while starting")
            if time.monotonic() > deadline:
                raise EngineProcessError(f"{self.name} (pid {self.pid}) did not connect within {START_TIMEOUT:.0f} s;"
                                         f" its log {self.log_path}:\n{self.log_tail()}")
        return box["c"]

    def log_tail(self, n: int = 25) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def _died(self, when: str) -> EngineProcessError:
        rc = self.proc.poll()
        how = f"was killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        gpus = f" on GPUs {self.gpus}" if self.gpus else ""
        return EngineProcessError(f"{self.name} (pid {self.pid}{gpus}, {self.model_path}) {how} {when}; the stage "
                                  f"keeps its committed parts: fix the cause and `opd resume`. Log tail:\n"
                                  f"{self.log_tail()}")

    def _reply(self, when: str) -> Any:
        while True:
            if self.conn.poll(0.2):
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    self.proc.wait(timeout=30)
                    raise self._died(when) from None
                break
            if self.proc.poll() is not None:
                raise self._died(when)
        status, payload = msg[0], msg[1]
        if status == "error":
            from opd_tasks.engines.replica import rebuild_error
            raise rebuild_error(payload, self.name)
        return payload

    def submit(self, method: str, *args: Any) -> None:
        if self._pending:
            raise EngineProcessError(f"{self.name}: a request is already in flight")
        try:
            self.conn.send((method, args))
        except (OSError, EOFError, BrokenPipeError):
            self.proc.wait(timeout=30)
            raise self._died(f"before {method}") from None
        self._pending = True

    def result(self) -> Any:
        self._pending = False
        return self._reply("mid-request")

    def call(self, method: str, *args: Any) -> Any:
        self.submit(method, *args)
        return self.result()

    # Generator / Scorer interface (one replica); engines/pool.py spreads over several
    def generate(self, prompt_ids, n, sampling):
        return self.call("generate", [list(map(int, p)) for p in prompt_ids], n, sampling)

    def score(self, prompt_ids, response_ids):
        return self.call("score", [list(map(int, p)) for p in prompt_ids], [list(map(int, r)) for r in response_ids])

    def score_topk(self, prompt_ids, response_ids, k: int):
        return self.call("score_topk", [list(map(int, p)) for p in prompt_ids],
                         [list(map(int, r)) for r in response_ids], int(k))

    def load_weights(self, path: str) -> None:
        self.call("load_weights", path)
        self.model_path = path

    def can_sleep(self) -> bool:
        return bool(self.alive() and self.call("can_sleep"))

    def sleep(self) -> None:
        self.call("sleep")

    def wake_up(self) -> None:
        self.call("wake_up")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        """End the engine: ask it to exit, then SIGTERM / SIGKILL its process group."""
        if self.conn is not None and self.alive():
            try:
                self.conn.send(("close", ()))
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except (ProcessLookupError, PermissionError):
                break
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        try:  # the group may outlive its leader (vLLM's engine core)
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=timeout)
        for closeable in (self.conn, self._listener):
            try:
                if closeable is not None:
                    closeable.close()
            except OSError:
                pass
        self.conn = None
        self._log.close()
        unregister_process(self.pid)
