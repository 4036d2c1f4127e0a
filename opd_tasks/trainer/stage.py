"""The train stage of a run: where its inputs and outputs live, skipped when already done.

    run_training(RunContext.load("runs/toy"), iteration=3)   # what flows/iteration.py's train task calls

Inputs: run.yaml, iter-N/scored, and the checkpoint after iteration N-1 (the student's model dir for
iteration 0, or the offline phase's HF export when the run has one). Outputs: checkpoints/iter-N
(DCP + hf/), iter-N/train/metrics.json + manifest.

    run_offline_training(ctx)   # the offline phase: offline/scored (kept rows) -> checkpoints/offline

The offline phase is the same trainer at iteration -1 (storage.layout.OFFLINE_ITERATION).
Like every train stage it is one unit: a kill before its manifest redoes it from its init weights
(deterministic: same seeds, same result).
"""
from __future__ import annotations

import time
from typing import Callable

from opd_tasks.context import RunContext
from opd_tasks.stages import StageResult
from opd_tasks.trainer import TrainError
from opd_tasks.trainer.launch import launch_options, launch_training
from storage.checkpoints import checkpoint_status, warm_start_dir
from storage.layout import OFFLINE_ITERATION
from storage.manifest import read_manifest

SUMMARY_KEYS = ("loss", "kl_k1", "kl_k3", "ratio_mean", "clip_frac", "grad_norm", "nll", "teacher_nll")


def train_paths(ctx: RunContext, iteration: int) -> dict[str, str]:
    """The trainer's arguments for `iteration` (URLs: plain paths on local disk)."""
    lay = ctx.layout
    if iteration == OFFLINE_ITERATION:
        return {"config": lay.url_of(lay.run_yaml), "scored_dir": lay.url_of(lay.offline_dir("scored")),
                "init_checkpoint": ctx.cfg.student.path, "out_checkpoint": lay.url_of(lay.offline_checkpoint_dir()),
                "train_dir": lay.url_of(lay.offline_dir("train"))}
    if iteration == 0:
        # the offline phase's weights, with a fresh optimizer: its Adam moments belong to another loss
        init = lay.url_of(warm_start_dir(lay)) if ctx.warm_start else ctx.cfg.student.path
    else:
        if checkpoint_status(lay, iteration - 1) != "done":
            raise TrainError(f"{lay.url_of(lay.checkpoint_dir(iteration - 1))}: the checkpoint after iteration "
                             f"{iteration - 1} is not complete; train iteration {iteration - 1} first (opd resume)")
        init = lay.url_of(lay.checkpoint_dir(iteration - 1))
    return {"config": lay.url_of(lay.run_yaml), "scored_dir": lay.url_of(lay.stage_dir(iteration, "scored")),
            "init_checkpoint": init, "out_checkpoint": lay.url_of(lay.checkpoint_dir(iteration)),
            "train_dir": lay.url_of(lay.stage_dir(iteration, "train"))}


def _print(line: str) -> None:
    print(line, flush=True)


def _train_inprocess(paths: dict[str, str], iteration: int) -> dict:
    """One rank in this process (a 1-rank gloo group on an in-memory store): the same worker code
    as under torchrun, without the process start and imports."""
    from opd_tasks.trainer.worker import TrainArgs, run
    return run(TrainArgs(**paths, iteration=iteration))


def _dirs(ctx: RunContext, iteration: int) -> tuple[str, str]:
    """(train stage dir, scored stage dir) of an iteration or of the offline phase."""
    if iteration == OFFLINE_ITERATION:
        return ctx.offline_dir("train"), ctx.offline_dir("scored")
    return ctx.stage_dir(iteration, "train"), ctx.stage_dir(iteration, "scored")


def run_offline_training(ctx: RunContext, on_line: Callable[[str], None] | None = None,
                         env: dict | None = None) -> StageResult:
    """The offline phase's train stage (sft on the kept rows of offline/scored) -> checkpoints/offline."""
    if ctx.cfg.offline is None:
        raise TrainError(f"{ctx.run_dir}: the run's config has no offline block; nothing to train offline")
    if read_manifest(ctx.layout.fs, ctx.offline_dir("filter")) is None:
        raise TrainError(f"{ctx.layout.url_of(ctx.offline_dir('filter'))}: the offline filter is not complete; "
                         f"run the offline phase's earlier steps first (opd resume)")
    return run_training(ctx, OFFLINE_ITERATION, on_line=on_line, env=env)


def run_training(ctx: RunContext, iteration: int, on_line: Callable[[str], None] | None = None,
                 env: dict | None = None) -> StageResult:
    """Train iteration `iteration` with torchrun (train.nproc_per_node x train.nnodes ranks).
    on_line receives every output line of the workers (default: stdout; the flows pass Prefect's run
    logger)."""
    fs = ctx.layout.fs
    stage, scored = _dirs(ctx, iteration)
    name = "offline-train" if iteration == OFFLINE_ITERATION else "train"
    if (m := read_manifest(fs, stage)) is not None:
        return StageResult(stage=name, iteration=iteration, skipped=True, metrics=dict(m.extra))
    if read_manifest(fs, scored) is None:
        raise TrainError(f"{ctx.layout.url_of(scored)}: the scored stage is not complete; score "
                         f"{'the offline data' if iteration == OFFLINE_ITERATION else f'iteration {iteration}'} "
                         f"first (opd resume)")
    from opd_tasks.engines.lifecycle import release_for_stage
    release_for_stage(ctx.cfg, "train")  # no engine keeps memory the trainer's GPUs need
    t0 = time.perf_counter()
    tc = ctx.cfg.train
    world = tc.nproc_per_node * tc.nnodes
    if tc.launcher == "inprocess" or (tc.launcher == "auto" and world == 1 and env is None):
        if world != 1:
            raise TrainError(f"train.launcher=inprocess runs one rank, but nproc_per_node x nnodes = {world}; "
                             f"use launcher: torchrun (or auto)")
        metrics = _train_inprocess(train_paths(ctx, iteration), iteration)
    else:
        metrics = launch_training(**train_paths(ctx, iteration), iteration=iteration, **launch_options(tc),
                                  env=env, on_line=on_line or _print)
    last = metrics["steps"][-1] if metrics["steps"] else {}
    summary = {k: last[k] for k in SUMMARY_KEYS if k in last}
    summary.update(step=metrics["step"], tokens_per_s=metrics["tokens_per_s"])
    return StageResult(stage=name, iteration=iteration, rows=metrics["rows"], seconds=time.perf_counter() - t0,
                       tokens=int(sum(s.get("tokens", 0) for s in metrics["steps"])), metrics=summary)
