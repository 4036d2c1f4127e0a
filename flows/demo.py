"""`opd demo`: the toy world end to end on a CPU in minutes.

A weak student is distilled on-policy from two domain teachers (addition, string reversal),
routed by domain (configs/toy.yaml). The toy world is built on first use and cached. At the end:
a table of per-domain accuracy (student before/after, each teacher) and KL per iteration, and
RUN/report.png + RUN/summary.json.

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
