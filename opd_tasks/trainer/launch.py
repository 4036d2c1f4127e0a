"""Run the trainer under torchrun in a subprocess: stream its output, surface a worker's error.

    metrics = launch_training(config="R/run.yaml", scored_dir="R/iter-000003/scored",
                              init_checkpoint="R/checkpoints/iter-000002",
                              out_checkpoint="R/checkpoints/iter-000003",
                              train_dir="R/iter-000003/train", iteration=3, nproc_per_node=2)

Prefect-free. Single node: `torchrun --standalone`.
Several nodes (`nnodes` > 1): one torchrun agent per node, all joining a c10d rendezvous at
`rdzv_endpoint` (host:port); opd starts each node's agent with `node_launcher`, a shell command
template ({command} = the agent's command line, {node_rank}, {nnodes}, {rdzv_endpoint}, {cwd}):
'ssh node{node_rank} "cd {cwd} && {command}"' (double quotes: {command} quotes with single
ones), "srun -N1 -n1 -r {node_rank} {command}", or plain "{command}" (all agents on this
machine, as in the tests). A node whose launcher fails stops the
others at once; a rendezvous that does not complete within `rdzv_timeout_s` names the nodes that
never joined.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Callable

from opd_tasks.trainer import ERROR_MARKER, TrainError

log = logging.getLogger("opd.train")
TAIL_LINES = 40


def torchrun_command(args: list[str], nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "opd-train", python: str = sys.executable,
                     rdzv_timeout_s: float | None = None) -> list[str]:
    """The torchrun command line (as `python -m torch.distributed.run`, so no PATH lookup is needed);
    with nnodes > 1 the same line on every node (c10d rendezvous; ranks are given in join order)."""
    if nproc_per_node < 1 or nnodes < 1:
        raise TrainError(f"train.nproc_per_node={nproc_per_node}, train.nnodes={nnodes}: both must be >= 1")
    cmd = [python, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    if nnodes == 1:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        if not rdzv_endpoint:
            raise TrainError(f"train.nnodes={nnodes} needs a rendezvous endpoint host:port reachable from every "
                             f"node (rdzv_endpoint); on one node set train.nnodes: 1")
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d", "--rdzv-endpoint", rdzv_endpoint,
                "--rdzv-id", rdzv_id]
        if rdzv_timeout_s is not None:
            cmd += ["--rdzv-conf", f"join_timeout={int(math.ceil(rdzv_timeout_s))}"]
    return cmd + ["-m", "opd_tasks.train", *args]


def trainer_args(config: str, scored_dir: str, init_checkpoint: str, out_checkpoint: str, train_dir: str,
                 iteration: int) -> list[str]:
    return ["--config", str(config), "--scored-dir", str(scored_dir), "--init-checkpoint", str(init_checkpoint),
            "--out-checkpoint", str(out_checkpoint), "--train-dir", str(train_dir), "--iteration", str(iteration)]


def run_streaming(cmd: list[str], env: dict | None = None, on_line: Callable[[str], None] | None = None,
                  what: str = "training") -> None:
    """Run `cmd`, passing each output line (stdout + stderr) to on_line as it comes.

    Raises TrainError with the workers' `opd-train error` lines (or the output's tail) when the
    command fails. The command runs in its own process group, torn down if we are interrupted.
    """
    on_line = on_line or log.info
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=full_env, start_new_session=True)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            on_line(line)
            tail.append(line)
            if ERROR_MARKER in line:
                errors.append(line[line.index(ERROR_MARKER):])
        rc = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (Ctrl-C, cancelled flow): stop every worker
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if rc != 0:
        detail = "\n".join(errors) if errors else "\n".join(tail)
        raise TrainError(f"{what} failed (exit code {rc}):\n{detail}")


def node_commands(agent: list[str], nnodes: int, node_launcher: str, rdzv_endpoint: str,
                  env: dict | None = None) -> list[str]:
    """One shell command per node (index = node rank): node_launcher with {command} = the agent's
    command line, prefixed by `env K=V ...` for the variables in `env` (they reach a remote node too)."""
    line = shlex.join((["env", *(f"{k}={v}" for k, v in (env or {}).items())] if env else []) + agent)
    return [node_launcher.format(command=line, node_rank=r, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                 cwd=shlex.quote(os.getcwd())) for r in range(nnodes)]


RDZV_TIMEOUT = "RendezvousTimeoutError"
GRACE_S = 5.0  # after one node fails, how long the others get to report before they are stopped


def run_nodes(cmds: list[str], env: dict | None = None, on_line: Callable[[str], None] | None = None,
              what: str = "training", rdzv_endpoint: str = "", rdzv_timeout_s: float = 0.0) -> None:
    """Run one shell command per node (node_commands), lines prefixed `[node R]`, all in their own
    process groups. The first node that exits non-zero stops the others (after GRACE_S for their
    reports) and raises TrainError naming it; a rendezvous timeout names the nodes that never joined."""
    on_line = on_line or log.info
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    lines: queue.Queue = queue.Queue()
    procs = [subprocess.Popen(c, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                              env=full_env, start_new_session=True) for c in cmds]

    def pump(r: int, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            lines.put((r, line.rstrip("\n")))
        lines.put((r, None))

    for r, p in enumerate(procs):
        threading.Thread(target=pump, args=(r, p), daemon=True).start()
    tails = [deque(maxlen=TAIL_LINES) for _ in procs]
    errors: list[list[str]] = [[] for _ in procs]
    timed_out: set[int] = set()
    rc: dict[int, int] = {}
    failed, deadline = None, math.inf
    try:
        while len(rc) < len(procs) and time.monotonic() < deadline:
            try:
                r, line = lines.get(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                continue
            if line is None:
                rc[r] = procs[r].wait()
                if rc[r] != 0 and failed is None:
                    failed, deadline = r, time.monotonic() + GRACE_S
                continue
            on_line(f"[node {r}] {line}")
            tails[r].append(line)
            if ERROR_MARKER in line:
                errors[r].append(line[line.index(ERROR_MARKER):])
            if RDZV_TIMEOUT in line:
                timed_out.add(r)
    finally:
        for r, p in enumerate(procs):
            if p.poll() is None:  # a failed peer or an interrupt: stop this node's launcher and agent
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if failed is None:
        return
    if timed_out:
        missing = [r for r in range(len(procs)) if r not in timed_out]
        how = "; ".join(f"node {r}: " + (f"launcher exited with code {rc[r]}: {tails[r][-1] if tails[r] else ''}"
                                          if r in rc else "launcher still running, stopped") for r in missing)
        raise TrainError(f"{what}: the rendezvous at {rdzv_endpoint} did not complete within {rdzv_timeout_s:g} s "
                         f"(train.rdzv_timeout_s): node(s) {missing} never joined ({how}); check those nodes' "
                         f"train.node_launcher command:\n{cmds[missing[0]] if missing else ''}")
    detail = "\n".join(errors[failed]) if errors[failed] else "\n".join(tails[failed])
    raise TrainError(f"{what} failed on node {failed} (exit code {rc[failed]}; its train.node_launcher command: "
                     f"{cmds[failed]}):\n{detail}")


def launch_options(train) -> dict:
    """launch_training's world-size and multi-node arguments from a TrainConfig."""
    return {"nproc_per_node": train.nproc_per_node, "nnodes": train.nnodes, "rdzv_endpoint": train.rdzv_endpoint,
            "node_launcher": train.node_launcher, "rdzv_timeout_s": train.rdzv_timeout_s}


def launch_training(*, config: str, scored_dir: str, init_checkpoint: str, out_checkpoint: str, train_dir: str,
                    iteration: int, nproc_per_node: int = 1, nnodes: int = 1, rdzv_endpoint: str | None = None,
                    node_launcher: str | None = None, rdzv_timeout_s: float = 600.0,
                    env: dict | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Train one iteration with torchrun (nproc_per_node ranks per node, nnodes nodes) and return its metrics.

    Every path may be a local path or an fsspec URL; see `python -m opd_tasks.train --help`.
    Several nodes: each node's agent is started with node_launcher (see the module docstring); the
    paths must be reachable from every node (a shared filesystem or an object store).
    Returns the parsed train/metrics.json. Raises TrainError with the worker's error text.
    """
    from storage.fs import filesystem, read_json

    args = trainer_args(config, scored_dir, init_checkpoint, out_checkpoint, train_dir, iteration)
    what = f"training iteration {iteration}"
    if nnodes == 1:
        cmd = torchrun_command(args, nproc_per_node, rdzv_id=f"opd-train-{iteration}")
        run_streaming(cmd, env=env, on_line=on_line, what=what)
    else:
        if not node_launcher:
            raise TrainError(f"train.nnodes={nnodes} needs train.node_launcher, the command that starts a node's "
                             f"agent (e.g. 'ssh node{{node_rank}} \"cd {{cwd}} && {{command}}\"')")
        agent = torchrun_command(args, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id=f"opd-train-{iteration}",
                                 rdzv_timeout_s=rdzv_timeout_s)
        run_nodes(node_commands(agent, nnodes, node_launcher, rdzv_endpoint, env), env=env, on_line=on_line,
                  what=what, rdzv_endpoint=rdzv_endpoint, rdzv_timeout_s=rdzv_timeout_s)
    fs, path = filesystem(train_dir)
    return read_json(fs, path.rstrip("/") + "/metrics.json")
