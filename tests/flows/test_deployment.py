"""deployments/prefect.yaml, for real: Prefect server + process work pool + worker + deployment runs.

    .venv/bin/python -m pytest -q tests/flows/test_deployment.py

The cheap test checks the shipped file against the flows (entrypoints, parameter names, configs,
schedules, the `{{ $OPD_REPO }}` pull step). The slow one does what the README's "Deployments"
section says, in its own PREFECT_HOME and SQLite database on a free 127.0.0.1 port: `prefect server
start`, `prefect work-pool create opd-cpu --type process`, `prefect deploy` of toy-nightly and
score-dataset from the shipped file (only their parameters overridden, to tiny random models),
`prefect worker start`, `prefect deployment run`; then it waits for the runs to complete, checks the
run directory's manifests, and fires toy-nightly again to see it resume the finished run (nothing
redone). Server, worker and the worker's flow-run processes are killed by process group at the end.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
STAGES = ("rollout", "scored", "train", "eval")


def _shipped() -> dict:
    return yaml.safe_load(PREFECT_YAML.read_text())


def _deployment(name: str) -> dict:
    return next(d for d in _shipped()["deployments"] if d["name"] == name)


def _flow_of(entrypoint: str):
    path, func = entrypoint.split(":")
    return getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)


def test_prefect_yaml_matches_the_flows(monkeypatch):
    """Every deployment names a real flow, only parameters it takes (all required ones given), a
    config that exists, a valid cron; the pull step is resolved from $OPD_REPO on the worker."""
    from prefect import Flow
    from prefect.utilities.templating import apply_values
    from prefect.client.schemas.schedules import CronSchedule

    spec = _shipped()
    names = {d["name"] for d in spec["deployments"]}
    assert {"toy-nightly", "score-dataset"} <= names
    for dep in spec["deployments"]:
        flow = _flow_of(dep["entrypoint"])
        assert isinstance(flow, Flow), dep["name"]
        sig = inspect.signature(flow.fn).parameters
        params = dep.get("parameters", {})
        assert set(params) <= set(sig), f"{dep['name']}: {set(params) - set(sig)} are not parameters of {flow.name}"
        required = {k for k, p in sig.items() if p.default is inspect.Parameter.empty}
        assert required <= set(params), f"{dep['name']}: {required - set(params)} missing"
        assert (REPO / params["config_path"]).is_file(), dep["name"]
        assert dep["work_pool"]["name"]
        limit = dep["concurrency_limit"]  # one flow run per deployment at a time (the run dir's lease refuses others)
        assert limit["limit"] == 1 and limit["collision_strategy"] in ("CANCEL_NEW", "ENQUEUE"), dep["name"]
        for sched in dep.get("schedules") or []:
            CronSchedule(cron=sched["cron"], timezone=sched.get("timezone"))
    nightly = _deployment("toy-nightly")
    assert nightly["entrypoint"] == "flows/run.py:opd_run" and nightly["schedules"]
    assert set(nightly["parameters"]) == {"config_path", "run_dir"}  # a fixed run_dir: each firing resumes it

    (step,) = spec["pull"]
    monkeypatch.setenv("OPD_REPO", "/some/checkout")
    assert apply_values(step, os.environ) == {
        "prefect.deployments.steps.set_working_directory": {"directory": "/some/checkout"}}


# ---------------------------------------------------------------- the real server, pool and worker

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (walking /proc), children first."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


class Processes:
    """Long-running subprocesses, each in its own session; stop() kills their process groups and the
    groups of their descendants (the process worker starts each flow run in a new session)."""

    def __init__(self):
        self.procs: list[tuple[subprocess.Popen, Path]] = []

    def start(self, args: list[str], env: dict, log: Path, cwd: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def stop(self) -> None:
        mine = os.getpgrp()
        groups = set()
        for proc, _ in self.procs:
            for pid in [proc.pid] + _descendants(proc.pid):
                try:
                    groups.add(os.getpgid(pid))
                except ProcessLookupError:
                    pass
        groups.discard(mine)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for g in groups:
                try:
                    os.killpg(g, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 15
            for proc, _ in self.procs:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass

    def logs(self, chars: int = 6000) -> str:
        return "\n".join(f"----- {log.name}\n{log.read_text(errors='replace')[-chars:]}" for _, log in self.procs)


@pytest.fixture
def processes():
    procs = Processes()
    yield procs
    procs.stop()


def _prefect(env: dict, *args: str, timeout: float = 180) -> str:
    """Run a `prefect` CLI command from the repository root; its output, or a failure showing it."""
    res = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"prefect {' '.join(args)} failed ({res.returncode}):\n{out[-4000:]}"
    return out


def _tiny_world(root: Path) -> dict:
    """Three tiny random Llamas, a prompt set and a responses file in the tokenizer's alphabet, and
    a one-iteration config; paths of each."""
    sys.path.insert(0, str(REPO / "tests" / "train"))
    from train_helpers import build_tiny_model
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, seed in (("student", 0), ("t1", 1), ("t2", 2)):
        build_tiny_model(root / name, seed=seed)
    rng = random.Random(0)
    text = lambda k: "".join(rng.choices("abcdefgh", k=k))  # noqa: E731
    rows = [{"prompt": text(rng.randint(2, 5)), "answer": text(2), "domain": "xy"[i % 2]} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), root / "prompts.parquet")
    responses = [{"prompt": r["prompt"], "response": text(3), "domain": r["domain"]} for r in rows[:4]]
    pq.write_table(pa.Table.from_pylist(responses), root / "responses.parquet")
    cfg = {"name": "deploy-test", "seed": 0, "iterations": 1, "student": {"path": str(root / "student")},
           "teachers": [{"name": "t1", "path": str(root / "t1"), "domain": "x"},
                        {"name": "t2", "path": str(root / "t2"), "domain": "y"}],
           "combination": "route", "loss": {"kind": "rkl"},
           "rollout": {"prompts_per_iteration": 4, "group_size": 2, "max_new_tokens": 6},
           "train": {"mini_batches": 1, "nproc_per_node": 1},
           "eval": {"every": 1, "max_prompts": 4, "max_new_tokens": 6},
           "data": {"train": str(root / "prompts.parquet"), "eval": str(root / "prompts.parquet"),
                    "verifiers": {"x": "exact", "y": "exact"}}}
    (root / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return {"config": str(root / "cfg.yaml"), "responses": str(root / "responses.parquet")}


def _env(home: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def _wait_healthy(url: str, server: subprocess.Popen, procs: Processes, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"prefect server exited with {server.returncode}:\n{procs.logs()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {timeout}s:\n{procs.logs()}")


def _trigger(env: dict, name: str) -> str:
    out = _prefect(env, "deployment", "run", name)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, f"no flow run id in the output of `prefect deployment run {name}`:\n{out}"
    return match.group(1)


def _wait_runs(api: str, run_ids: list[str], procs: Processes, timeout: float = 360) -> dict[str, str]:
    """Poll the flow runs until all are terminal; {id: state type}."""
    deadline, states = time.monotonic() + timeout, {}
    while time.monotonic() < deadline:
        for rid in run_ids:
            states[rid] = httpx.get(f"{api}/flow_runs/{rid}", timeout=10).json()["state"]["type"]
        if all(s in TERMINAL for s in states.values()):
            return states
        time.sleep(2)
    pytest.fail(f"flow runs not finished after {timeout}s: {states}\n{procs.logs()}")


@pytest.mark.slow
@pytest.mark.prefect_server
def test_deployments_run_on_a_real_server_pool_and_worker(tmp_path, processes):
    times = {}
    files = _tiny_world(tmp_path)
    run_dir = tmp_path / "run"
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"

    # The scheduler service stays off: toy-nightly's cron must not fire a second run mid-test.
    t = time.monotonic()
    server = processes.start(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        _env(home, PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}",
             PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false", PREFECT_UI_ENABLED="false"),
        tmp_path / "server.log", tmp_path)
    _wait_healthy(api, server, processes)
    times["server_start_s"] = time.monotonic() - t

    client = _env(home, PREFECT_API_URL=api)
    t = time.monotonic()
    _prefect(client, "work-pool", "create", "opd-cpu", "--type", "process")
    _prefect(client, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "toy-nightly",
             "--params", json.dumps({"config_path": files["config"], "run_dir": str(run_dir)}))
    _prefect(client, "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "score-dataset",
             "--params", json.dumps({"config_path": files["config"], "input_path": files["responses"],
                                     "output": str(tmp_path / "offline")}))
    times["pool_and_deploy_s"] = time.monotonic() - t

    stored = httpx.get(f"{api}/deployments/name/opd-run/toy-nightly", timeout=10).json()
    shipped = _deployment("toy-nightly")
    assert stored["entrypoint"] == shipped["entrypoint"] and stored["work_pool_name"] == "opd-cpu"
    assert stored["pull_steps"] == _shipped()["pull"]  # resolved on the worker, not at deploy time
    assert [s["schedule"]["cron"] for s in stored["schedules"]] == [s["cron"] for s in shipped["schedules"]]

    # The worker runs in tmp_path: only the pull step's chdir to $OPD_REPO finds flows/run.py.
    processes.start([sys.executable, "-m", "prefect", "worker", "start", "--pool", "opd-cpu"],
                    _env(home, PREFECT_API_URL=api, OPD_REPO=str(REPO), PREFECT_WORKER_QUERY_SECONDS="1"),
                    tmp_path / "worker.log", tmp_path)
    t = time.monotonic()
    runs = [_trigger(client, "opd-run/toy-nightly"), _trigger(client, "opd-score-dataset/score-dataset")]
    states = _wait_runs(api, runs, processes)
    times["runs_s"] = time.monotonic() - t
    assert list(states.values()) == ["COMPLETED", "COMPLETED"], f"{states}\n{processes.logs()}"

    assert (run_dir / "run.yaml").is_file()
    manifests = {s: run_dir / "iter-000000" / s / "_MANIFEST.json" for s in STAGES}
    missing = [s for s, m in manifests.items() if not m.is_file()]
    assert not missing, f"no manifest for stages {missing} in {run_dir}"
    assert (tmp_path / "offline" / "_MANIFEST.json").is_file()
    before = {s: (m.read_bytes(), m.stat().st_mtime_ns) for s, m in manifests.items()}
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1

    # The next firing of the nightly deployment resumes the same (finished) run: nothing is redone.
    t = time.monotonic()
    states = _wait_runs(api, [_trigger(client, "opd-run/toy-nightly")], processes)
    times["second_firing_s"] = time.monotonic() - t
    assert list(states.values()) == ["COMPLETED"], f"{states}\n{processes.logs()}"
    assert {s: (m.read_bytes(), m.stat().st_mtime_ns) for s, m in manifests.items()} == before
    assert (run_dir / "metrics.jsonl").read_text().splitlines() == metrics
    print(json.dumps({k: round(v, 1) for k, v in times.items()}))
