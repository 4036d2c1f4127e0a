"""The train stage of a run: where its inputs and outputs live, skipped when already done.

    run_training(RunContext.load("runs/toy"), iteration=3)   # what flows/iteration.py's train task calls

Inputs: run.yaml, iter-N/scored, and the checkpoint after iteration N-1 (the student's model dir for
iteration 0). Outputs: checkpoints/iter-N (DCP + hf/), iter-N/train/metrics.json + manifest.
"""
from __future__ import annotations

import time

from opd_tasks.context import RunContext
from opd_tasks.stages import StageResult
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.launch import launch_training
from storage.checkpoints import checkpoint_status
from storage.manifest import read_manifest

SUMMARY_KEYS = ("loss", "kl_k1", "kl_k3", "ratio_mean", "clip_frac", "grad_norm")


def train_paths(ctx: RunContext, iteration: int) -> dict[str, str]:
    """The trainer's arguments for `iteration` (URLs: plain paths on local disk)."""
    lay = ctx.layout
    if iteration == 0:
        init = ctx.cfg.student.path
    else:
        if checkpoint_status(lay, iteration - 1) != "done":
            raise TrainError(f"{lay.url_of(lay.checkpoint_dir(iteration - 1))}: the checkpoint after iteration "
                             f"{iteration - 1} is not complete; train iteration {iteration - 1} first (opd resume)")
        init = lay.url_of(lay.checkpoint_dir(iteration - 1))
    return {"config": lay.url_of(lay.run_yaml), "scored_dir": lay.url_of(lay.stage_dir(iteration, "scored")),
            "init_checkpoint": init, "out_checkpoint": lay.url_of(lay.checkpoint_dir(iteration)),
            "train_dir": lay.url_of(lay.stage_dir(iteration, "train"))}


def _log_sink():
    """Worker output goes to the Prefect run logger inside a flow/task run, else to stdout."""
    try:
        from prefect import get_run_logger
        return get_run_logger().info
    except Exception:  # noqa: BLE001 - no Prefect run context (plain Python call)
        return lambda line: print(line, flush=True)


def _train_inprocess(paths: dict[str, str], iteration: int) -> dict:
    """One rank in this process (a 1-rank gloo group on an in-memory store): the same worker code
    as under torchrun, without the process start and imports."""
    from opd_tasks.trainer.worker import TrainArgs, run
    return run(TrainArgs(**paths, iteration=iteration))


def run_training(ctx: RunContext, iteration: int, on_line=None, env: dict | None = None) -> StageResult:
    """Train iteration `iteration` with torchrun (train.nproc_per_node x train.nnodes ranks).
    on_line receives every output line of the workers (default: Prefect's run logger or stdout)."""
    fs = ctx.layout.fs
    stage = ctx.stage_dir(iteration, "train")
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage="train", iteration=iteration, skipped=True, metrics=dict(m.extra))
    if read_manifest(fs, ctx.stage_dir(iteration, "scored")) is None:
        raise TrainError(f"{ctx.layout.url_of(ctx.stage_dir(iteration, 'scored'))}: the scored stage is not "
                         f"complete; score iteration {iteration} first (opd resume)")
    t0 = time.perf_counter()
    tc = ctx.cfg.train
    world = tc.nproc_per_node * tc.nnodes
    if tc.launcher == "inprocess" or (tc.launcher == "auto" and world == 1 and env is None):
        if world != 1:
            raise TrainError(f"train.launcher=inprocess runs one rank, but nproc_per_node x nnodes = {world}; "
                             f"use launcher: torchrun (or auto)")
        metrics = _train_inprocess(train_paths(ctx, iteration), iteration)
    else:
        metrics = launch_training(**train_paths(ctx, iteration), iteration=iteration,
                                  nproc_per_node=tc.nproc_per_node, nnodes=tc.nnodes,
                                  env=env, on_line=on_line or _log_sink())
    last = metrics["steps"][-1] if metrics["steps"] else {}
    summary = {k: last[k] for k in SUMMARY_KEYS if k in last}
    summary.update(step=metrics["step"], tokens_per_s=metrics["tokens_per_s"])
    return StageResult(stage="train", iteration=iteration, rows=metrics["rows"], seconds=time.perf_counter() - t0,
                       tokens=int(sum(s.get("tokens", 0) for s in metrics["steps"])), metrics=summary)
