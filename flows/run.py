"""A whole run: an optional offline phase, then N iterations of rollout -> score -> train -> evaluate,
resumable.

    opd run configs/toy.yaml --run-dir runs/toy     # or: python -m flows.run configs/toy.yaml runs/toy
    opd resume runs/toy                             # same thing, from the stored run.yaml

`opd_run` writes run.yaml once (a changed config is refused unless only `iterations`-like fields
changed), runs the offline phase (flows/offline.py) when the config has an `offline:` block (its
finished stages are skipped), finds the first iteration that is not complete, and runs the rest,
one subflow per iteration. After each iteration it appends a line to metrics.jsonl, writes the scored
stage's HTML view (RUN/iter-N/inspect.html) and publishes a Prefect table artifact linking it; a
progress artifact tracks the run. One process writes a run directory at a time: the run holds its
lease (storage/lock.py, RUN/_lock/) from before run.yaml is written until it returns; a second
`opd run`/`opd resume` (or a second firing of a deployment) is refused, naming the holder.
"""
from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact

from flows.iteration import opd_iteration
from flows.offline import opd_offline
from opd_tasks.config import RunConfig, load_config
from opd_tasks.context import RunContext, prepare_run
from opd_tasks.inspect_html import write_iteration_view
from opd_tasks.summary import iteration_summary, record_iteration, recorded_iterations
from storage.layout import RunLayout
from storage.lock import acquire_lease
from opd_tasks.verifiers import check_run_verifiers
from storage.manifest import stage_status


def first_incomplete(ctx: RunContext, total: int) -> int:
    """The first iteration whose evaluation stage (the last one) has no manifest."""
    for n in range(total):
        if stage_status(ctx.layout.fs, ctx.stage_dir(n, "eval")) != "done":
            return n
    return total


def iteration_settings():
    """Settings for the per-iteration subflow: no heartbeat thread of its own. The opd-run flow
    around it keeps heartbeating for the process (crash detection); Prefect 3.8's per-flow-run
    heartbeat thread sleeps in 1 s steps and is joined when the flow run ends, which cost each
    iteration ~0.9 s of waiting (benchmarks/README.md, "Iteration")."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
    return temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _artifact_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def _table(row: dict, view: str | None = None) -> list[dict]:
    flat = [{"metric": "loss", "value": row.get("loss")}, {"metric": "reward_mean", "value": row.get("reward_mean")},
            {"metric": "kl(student||combined)", "value": row.get("kl_combined")}]
    flat += [{"metric": f"kl(student||{k})", "value": v} for k, v in (row.get("kl") or {}).items()]
    flat += [{"metric": f"accuracy/{d}", "value": v} for d, v in (row.get("accuracy") or {}).items()]
    flat += [{"metric": f"seconds/{k}", "value": v} for k, v in row["seconds"].items()]
    flat += [{"metric": f"tokens_per_s/{k}", "value": v} for k, v in row["tokens_per_s"].items()]
    flat.append({"metric": "inspect_html", "value": view})
    return flat


@flow(name="opd-run", log_prints=True)
def opd_run(config_path: str, run_dir: str | None = None, iterations: int | None = None,
            plan_check: bool = True) -> dict:
    """Run (or resume) the run of `config_path` in `run_dir` (default: config's run_dir, else runs/NAME)."""
    cfg = load_config(config_path)
    return run_config(cfg, run_dir, iterations, plan_check)


def _flow_run_id() -> str | None:
    from prefect.runtime import flow_run
    return flow_run.id


def run_config(cfg: RunConfig, run_dir: str | None = None, iterations: int | None = None,
               plan_check: bool = True) -> dict:
    run_dir = run_dir or cfg.run_dir or f"runs/{cfg.name}"
    with acquire_lease(RunLayout(run_dir), flow_run=_flow_run_id()) as lease:
        return _run_locked(cfg, run_dir, iterations, lease, plan_check)


def _run_locked(cfg: RunConfig, run_dir: str, iterations: int | None, lease, plan_check: bool = True) -> dict:
    from opd_tasks.engines.lifecycle import ENGINES, clean_orphans
    from opd_tasks.placement import check_plan
    logger = get_run_logger()
    updates = {"iterations": iterations} if iterations is not None else {}
    cfg = cfg.model_copy(update={**updates, "run_dir": run_dir})
    ctx = prepare_run(cfg, run_dir)
    check_run_verifiers(ctx.cfg)  # a domain without a verifier fails now, not at the first evaluation
    if plan_check:  # before any engine starts: a stage that cannot fit fails here, naming the field
        check_plan(ctx.cfg, log=logger.info)
    for line in clean_orphans(ctx.run_dir):  # engines left by a killed earlier process of this run
        logger.warning(line)
    # the warm start (iteration 0 starts from its checkpoint); its evaluation is its last stage
    if ctx.cfg.offline is not None and stage_status(ctx.layout.fs, ctx.layout.offline_dir("evaluation")) != "done":
        opd_offline(ctx.run_dir)
    total = ctx.cfg.iterations
    start = first_incomplete(ctx, total)
    recorded = recorded_iterations(ctx)
    for n in sorted(set(range(start)) - recorded):  # killed between its eval manifest and its metrics line
        record_iteration(ctx, iteration_summary(ctx, n, {}))
    logger.info("run %s: %d/%d iterations complete, config %s", ctx.run_dir, start, total, ctx.config_hash)
    key = _artifact_key(f"{cfg.name}-progress")
    progress = create_progress_artifact(progress=100.0 * start / max(total, 1), key=key,
                                        description=f"iterations of {ctx.run_dir}")
    try:
        for n in range(start, total):
            lease.check()  # still ours (a holder cut off for longer than the lease's ttl must not go on)
            with iteration_settings():
                stages = opd_iteration(ctx.run_dir, n)
            row = iteration_summary(ctx, n, stages)
            record_iteration(ctx, row)
            view = write_iteration_view(ctx.layout, n)
            create_table_artifact(key=_artifact_key(f"{cfg.name}-iteration-{n:04d}"), table=_table(row, view),
                                  description=f"{ctx.run_dir} iteration {n}" + (f"; token view: {view}" if view else ""))
            update_progress_artifact(progress, progress=100.0 * (n + 1) / max(total, 1))
    finally:  # normal end or error: every engine opd started ends here (SIGTERM: lifecycle's handler)
        ENGINES.close_all()
    return {"run_dir": ctx.run_dir, "iterations": total, "resumed_at": start}


def run_from_config(config: Path | str, run_dir: str | None = None, iterations: int | None = None,
                    plan_check: bool = True, before_flow=None) -> dict:
    load_config(config)  # a bad config fails here, before Prefect starts
    if before_flow is not None:  # the CLI's: wait for the Prefect server it started (flows/prefect_api.py)
        before_flow()
    return opd_run(str(config), run_dir=run_dir, iterations=iterations, plan_check=plan_check)


@flow(name="opd-resume", log_prints=True)
def resume_run(run_dir: str, iterations: int | None = None, plan_check: bool = True) -> dict:
    """Continue the run stored in run_dir/run.yaml."""
    ctx = RunContext.load(run_dir)
    return run_config(ctx.raw, run_dir, iterations, plan_check)


if __name__ == "__main__":
    import sys
    opd_run(sys.argv[1], *(sys.argv[2:3]))
