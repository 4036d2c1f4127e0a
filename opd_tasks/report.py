"""The end-of-run report: summary.json, report.png (matplotlib) and a table in the terminal (rich).

Built from the run's own files (metrics.jsonl and the evaluation baseline), so it can be redrawn
for any run at any time: `python -m opd_tasks.report RUN`.
"""
from __future__ import annotations

import io
import sys

from opd_tasks.context import RunContext
from opd_tasks.summary import read_metrics
from storage.fs import write_bytes_atomic, write_json_atomic


def offline_summary(ctx: RunContext, baseline: dict) -> dict | None:
    """The offline phase's effect (None without an `offline:` block): accuracy before (the initial
    student) and after the warm start, and how many teacher samples the filter kept."""
    import posixpath

    from storage.fs import exists, read_json
    from storage.manifest import read_manifest
    if ctx.cfg.offline is None:
        return None
    fs = ctx.layout.fs
    ev_path = posixpath.join(ctx.offline_dir("evaluation"), "metrics.json")
    ev = read_json(fs, ev_path) if exists(fs, ev_path) else {}
    flt = read_manifest(fs, ctx.offline_dir("filter"))
    extra = (flt.extra or {}) if flt is not None else {}
    return {"source": ctx.cfg.offline.source, "rows": extra.get("rows"), "kept": extra.get("kept"),
            "accuracy_before": baseline.get("student", {}), "accuracy_after": ev.get("accuracy") or {},
            "eval_seconds": ev.get("seconds")}


def run_summary(ctx: RunContext, baseline: dict) -> dict:
    """summary.json: teachers with their domains and accuracies, the student before and after."""
    rows = read_metrics(ctx)
    evaluated = [r for r in rows if r.get("accuracy")]
    final = evaluated[-1]["accuracy"] if evaluated else {}
    teachers = baseline.get("teachers", {})
    fraction = {t.domain: final[t.domain] / teachers[t.name][t.domain] for t in ctx.cfg.teachers
                if t.domain in final and teachers.get(t.name, {}).get(t.domain)}
    return {
        "run_dir": ctx.run_dir,
        "config_hash": ctx.config_hash,
        "loss": ctx.cfg.loss.kind,
        "combination": ctx.cfg.combination,
        "iterations": len(rows),
        "teachers": {t.name: {"domain": t.domain, "weight": t.weight} for t in ctx.cfg.teachers},
        "offline": (off := offline_summary(ctx, baseline)),
        "accuracy": {"student_initial": baseline.get("student", {}),
                     **({"student_warm_start": off["accuracy_after"]} if off and off["accuracy_after"] else {}),
                     "student_final": final,
                     **{t.name: teachers.get(t.name, {}) for t in ctx.cfg.teachers}},
        "fraction_of_teacher": fraction,  # final student / its domain's teacher, per domain
        "kl_per_iteration": [{"iteration": r["iteration"], **(r.get("kl") or {})} for r in rows],
    }


def plot_report(summary: dict, rows: list[dict]) -> bytes:
    """PNG: accuracy per domain per iteration (teacher levels as dashed lines); KL per teacher."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    init = summary["accuracy"]["student_initial"]
    domains = sorted(init) or sorted({d for r in rows for d in (r.get("accuracy") or {})})
    colors = dict(zip(domains, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    warm = summary["accuracy"].get("student_warm_start") or {}
    last = max([r["iteration"] for r in rows] or [0])
    gap = max(1.5, 0.12 * last)  # x of the initial student and the warm start, left of iteration 0
    x_init, x_warm = (-2 * gap, -gap) if warm else (-gap, None)
    for d in domains:
        xs = [x_init] + [r["iteration"] for r in rows if r.get("accuracy")]
        ys = [init.get(d)] + [r["accuracy"].get(d) for r in rows if r.get("accuracy")]
        if d in warm:  # the offline phase: initial -> warm start -> on-policy iterations
            xs.insert(1, x_warm)
            ys.insert(1, warm[d])
            ax1.scatter([x_warm], [warm[d]], marker="s", s=60, color=colors[d], zorder=3,
                        label=f"student after the offline warm start: {d}")
        ax1.plot(xs, ys, marker="o", color=colors[d], label=f"student: {d}")
        for name, t in summary["teachers"].items():
            acc = summary["accuracy"].get(name, {}).get(d)
            if t["domain"] == d and acc is not None:
                ax1.axhline(acc, ls="--", color=colors[d], alpha=0.7, label=f"teacher {name}: {d}")
    ticks = [t for t in ax1.get_xticks() if 0 <= t <= last]
    ax1.set_xticks([x_init] + ([x_warm] if warm else []) + ticks,
                   ["initial"] + (["warm\nstart"] if warm else []) + [f"{t:g}" for t in ticks])
    if warm:
        ax1.axvline(-gap / 2, color="grey", lw=0.8, ls=":")
    ax1.set(xlabel="on-policy iteration" + (" (left of the dotted line: the offline phase)" if warm else ""), ylabel="greedy accuracy", ylim=(0, 1.02),
            title="accuracy per domain")
    ax1.legend(fontsize=8)
    for name in summary["teachers"]:
        pts = [(r["iteration"], (r.get("kl") or {}).get(name)) for r in rows]
        pts = [p for p in pts if p[1] is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", label=f"KL(student || {name})")
    ax2.set(xlabel="iteration", ylabel="per-token KL estimate (k1, nats)",
            title="KL(student || teacher) on the teacher's domain")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def render_table(summary: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc = summary["accuracy"]
    domains = sorted(acc["student_initial"] or acc["student_final"])
    t = Table(title=f"accuracy per domain: {summary['run_dir']}")
    t.add_column("model")
    for d in domains:
        t.add_column(d, justify="right")
    for label, key in (("student (initial)", "student_initial"), ("student (after warm start)", "student_warm_start"),
                       ("student (final)", "student_final")):
        if key in acc:
            t.add_row(label, *[f"{acc[key].get(d, float('nan')):.3f}" for d in domains])
    for name, info in summary["teachers"].items():
        t.add_row(f"teacher {name} ({info['domain']})", *[f"{acc.get(name, {}).get(d, float('nan')):.3f}" for d in domains])
    frac = summary.get("fraction_of_teacher") or {}
    if frac:
        t.add_row("student (final) / its domain's teacher", *[f"{100 * frac[d]:.0f}%" if d in frac else "-"
                                                               for d in domains])
    console.print(t)
    k = Table(title="mean per-token KL(student || teacher) on its domain, per iteration")
    k.add_column("iteration", justify="right")
    names = list(summary["teachers"])
    for n in names:
        k.add_column(n, justify="right")
    k.add_column("loss", justify="right")
    step = max(1, -(-len(rows) // 12))  # at most ~12 rows: every step-th iteration and the last
    for r in [r for i, r in enumerate(rows) if i % step == 0 or i == len(rows) - 1]:
        kl = r.get("kl") or {}
        k.add_row(str(r["iteration"]), *[f"{kl[n]:.4f}" if kl.get(n) is not None else "-" for n in names],
                  f"{r['loss']:.4f}" if r.get("loss") is not None else "-")
    console.print(k)


def write_report(ctx: RunContext, baseline: dict) -> dict:
    """Write summary.json and report.png into the run directory; return the summary."""
    fs, layout = ctx.layout.fs, ctx.layout
    summary = run_summary(ctx, baseline)
    rows = read_metrics(ctx)
    write_json_atomic(fs, layout.join("summary.json"), summary)
    write_bytes_atomic(fs, layout.join("report.png"), plot_report(summary, rows))
    return summary


if __name__ == "__main__":
    from opd_tasks.eval_stage import read_baseline
    c = RunContext.load(sys.argv[1])
    s = write_report(c, read_baseline(c))
    render_table(s, read_metrics(c))
