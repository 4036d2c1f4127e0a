"""Run the trainer under torchrun in a subprocess: stream its output, surface a worker's error.

    metrics = launch_training(config="R/run.yaml", scored_dir="R/iter-000003/scored",
                              init_checkpoint="R/checkpoints/iter-000002",
                              out_checkpoint="R/checkpoints/iter-000003",
                              train_dir="R/iter-000003/train", iteration=3, nproc_per_node=2)

Single node: `torchrun --standalone`;
several nodes: the same call on every node with `nnodes` and a shared `rdzv_endpoint` (host:port).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections import deque
from typing import Callable

from opd_tasks.trainer import ERROR_MARKER, TrainError

log = logging.getLogger("opd.train")
TAIL_LINES = 40


def torchrun_command(args: list[str], nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "opd-train", python: str = sys.executable) -> list[str]:
    """The torchrun command line (as `python -m torch.distributed.run`, so no PATH lookup is needed)."""
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


def launch_training(*, config: str, scored_dir: str, init_checkpoint: str, out_checkpoint: str, train_dir: str,
                    iteration: int, nproc_per_node: int = 1, nnodes: int = 1, rdzv_endpoint: str | None = None,
                    env: dict | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Train one iteration with torchrun (nproc_per_node ranks per node) and return its metrics.

    Every path may be a local path or an fsspec URL; see `python -m opd_tasks.train --help`.
    Returns the parsed train/metrics.json. Raises TrainError with the worker's error text.
    """
    from storage.fs import filesystem, read_json

    args = trainer_args(config, scored_dir, init_checkpoint, out_checkpoint, train_dir, iteration)
    cmd = torchrun_command(args, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id=f"opd-train-{iteration}")
    run_streaming(cmd, env=env, on_line=on_line, what=f"training iteration {iteration}")
    fs, path = filesystem(train_dir)
    return read_json(fs, path.rstrip("/") + "/metrics.json")
