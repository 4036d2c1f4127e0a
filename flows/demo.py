"""`opd demo`: the toy world end to end on a CPU in minutes, the design card's whole workflow.

configs/toy.yaml: an offline phase first (each train prompt sampled by its domain's teacher, the
samples scored by the teachers into an inspectable dataset, wrong answers dropped by the verifier,
SFT warm start), then on-policy iterations in which the student samples, the teacher of each
prompt's domain (`route`) stores its top-8 per token, and the student trains on forward KL to it
plus the sampled-token term. The toy world is built on first use and cached. At the end: a table of
per-domain accuracy (student before, after the warm start and at the end; each teacher) and KL per
iteration, and RUN/report.png + RUN/summary.json.

    opd demo [--run-dir runs/demo] [--iterations N]
"""
from __future__ import annotations

from pathlib import Path

from flows.run import opd_run
from opd_tasks.context import RunContext

TOY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "toy.yaml"


def run_demo(run_dir: str | None = None, iterations: int | None = None, config: Path = TOY_CONFIG) -> dict:
    from opd_tasks.eval_stage import read_baseline
    from opd_tasks.report import render_table, write_report
    from opd_tasks.summary import read_metrics

    run_dir = run_dir or "runs/demo"
    opd_run(str(config), run_dir=run_dir, iterations=iterations)
    ctx = RunContext.load(run_dir)
    summary = write_report(ctx, read_baseline(ctx))
    render_table(summary, read_metrics(ctx))
    print(f"wrote {ctx.layout.url_of(ctx.layout.join('report.png'))} and summary.json")
    return summary
