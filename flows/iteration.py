"""One OPD iteration as a Prefect flow: rollout -> score -> train -> evaluate.

    from flows.iteration import opd_iteration
    opd_iteration(run_dir="runs/toy", iteration=3)      # flow run named iteration-0003

Each task checks its stage manifest first and returns at once when the stage is done, so
re-running an iteration (or the whole run) redoes nothing that finished. The manifests, not
Prefect's database, are the truth: a fresh Prefect database resumes just as well.
Tasks take (run_dir, iteration) and return small StageResult models, never tensors or tables.

Streaming (opd_tasks.scoring.streams: the teachers run apart from the rollout engine, or
scoring.streaming: on): the rollout task is submitted to the flow's task runner (a thread) and the
score task runs beside it, scoring each rollout part once it is committed; training starts after
both. The shards are the same as one stage after the other.
"""
from __future__ import annotations

import threading

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from opd_tasks.context import RunContext
from opd_tasks.errors import OpdError
from opd_tasks.stages import StageResult


def _retryable(task, task_run, state) -> bool:
    """Retry what a retry can fix (I/O, network, a remote server); not a user error (OpdError names
    the fix) or a programming error."""
    exc = state.result(raise_on_failure=False)
    return isinstance(exc, (OSError, ConnectionError, TimeoutError)) and not isinstance(exc, OpdError)


# Storage hiccups and remote scoring servers are worth retrying; a failing model load is not.
IO_RETRIES = dict(retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_retryable)


@task(name="rollout", cache_policy=NO_CACHE)
def rollout(run_dir: str, iteration: int) -> StageResult:
    from opd_tasks.rollout import run_rollout
    return run_rollout(RunContext.load(run_dir), iteration)


@task(name="score", cache_policy=NO_CACHE, **IO_RETRIES)
def score(run_dir: str, iteration: int, rollout_writing=None) -> StageResult:
    """rollout_writing: streaming, true while the rollout task still runs (opd_tasks.scoring.run_scoring)."""
    from opd_tasks.scoring import run_scoring
    return run_scoring(RunContext.load(run_dir), iteration, rollout_writing=rollout_writing)


def _first_imports(ctx: RunContext, iteration: int) -> None:
    """Two stages making their first imports in two threads race in transformers' lazy module (seen:
    "cannot import name 'AutoTokenizer' from 'transformers'"): make them here first, in one thread."""
    import opd_tasks.engines.hf  # noqa: F401
    import opd_tasks.engines.remote  # noqa: F401
    import opd_tasks.rollout  # noqa: F401
    from opd_tasks.models import load_tokenizer
    load_tokenizer(ctx.student_path(iteration), ctx.cfg.student.trust_remote_code, role="student")


def rollout_and_score(run_dir: str, iteration: int) -> dict[str, StageResult]:
    """The rollout then the scoring stage, or both at once when scoring streams (module docstring)."""
    from opd_tasks.scoring import streams
    from storage.manifest import read_manifest
    ctx = RunContext.load(run_dir)
    if not streams(ctx.cfg) or read_manifest(ctx.layout.fs, ctx.stage_dir(iteration, "rollout")) is not None:
        return {"rollout": rollout(run_dir, iteration), "scored": score(run_dir, iteration)}
    _first_imports(ctx, iteration)
    ended = threading.Event()
    future = rollout.submit(run_dir, iteration)
    future.add_done_callback(lambda _: ended.set())
    try:
        scored = score(run_dir, iteration, rollout_writing=lambda: not ended.is_set())
    finally:  # the rollout's own error first (the scoring then only says it stopped early)
        result = future.result()
    return {"rollout": result, "scored": scored}


@task(name="train", cache_policy=NO_CACHE)
def train(run_dir: str, iteration: int) -> StageResult:
    from opd_tasks.trainer.stage import run_training
    return run_training(RunContext.load(run_dir), iteration, on_line=get_run_logger().info)


@task(name="evaluate", cache_policy=NO_CACHE, **IO_RETRIES)
def evaluate(run_dir: str, iteration: int) -> StageResult:
    from opd_tasks.eval_stage import run_evaluation
    return run_evaluation(RunContext.load(run_dir), iteration)


@flow(name="opd-iteration", flow_run_name="iteration-{iteration:04d}", log_prints=True)
def opd_iteration(run_dir: str, iteration: int) -> dict[str, StageResult]:
    stages = rollout_and_score(run_dir, iteration)
    stages["train"] = train(run_dir, iteration)
    stages["eval"] = evaluate(run_dir, iteration)
    for s in stages.values():
        print(f"iteration {iteration} {s.stage}: " + ("done before, skipped" if s.skipped
              else f"{s.rows} rows in {s.seconds:.1f}s ({s.tokens_per_s:.0f} tok/s)"))
    return stages


if __name__ == "__main__":
    import sys
    opd_iteration(sys.argv[1], int(sys.argv[2]))
