"""The reports of `opd status` and `opd inspect` as rich tables (the reports themselves are JSON-able
dicts: opd_tasks/status.py, opd_tasks/inspect.py)."""
from __future__ import annotations

from typing import Any

from storage.layout import STAGES

_COLOR = {"done": "green", "partial": "yellow", "missing": "dim"}


def _console(console=None):
    from rich.console import Console

    return console or Console()


def render_status(report: dict, console=None) -> None:
    """The status report as a table: one row per iteration, one column per stage + checkpoint."""
    from rich.table import Table

    con = _console(console)
    planned = report.get("iterations_planned")
    title = f"run {report.get('name') or ''} at {report['run_dir']}" + (f" ({planned} iterations planned)" if planned else "")
    tab = Table(title=title)
    for c in ("iteration", *STAGES, "checkpoint", "rows (rollout/scored)", "stray files"):
        tab.add_column(c)
    for it in report["iterations"]:
        cells = [f"[{_COLOR[v]}]{v}[/]" for v in (*(it["stages"][s] for s in STAGES), it["checkpoint"])]
        rows = "/".join(str(it["rows"].get(s, "-")) for s in ("rollout", "scored"))
        stray = ", ".join(f"{s}: {len(v)}" for s, v in it["stray"].items())
        tab.add_row(str(it["iteration"]), *cells, rows, stray)
    con.print(tab)
    latest = report.get("latest_checkpoint")
    warm = (report.get("offline") or {}).get("checkpoint") == "done"
    con.print(f"latest checkpoint: iteration {latest['iteration']} at {latest['path']}" if latest
              else "latest checkpoint: none (iteration 0 rolls out from the " +
              ("offline phase's checkpoint, checkpoints/offline)" if warm else "initial student)"))
    if report.get("offline"):
        con.print("offline phase: " + ", ".join(f"{s} [{_COLOR[v]}]{v}[/]" for s, v in report["offline"].items()))


def _fmt(x: Any) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def _ids(ids: list[int], n: int = 24) -> str:
    return " ".join(map(str, ids[:n])) + (" ..." if len(ids) > n else "")


def _tok(text: str | None, token_id: int) -> str:
    return repr(text) if text is not None else f"#{token_id}"


def render_inspect(report: dict, console=None) -> None:
    """The inspect report as tables: teachers, rewards/lengths, top samples, top tokens, one sample."""
    from rich.table import Table

    con = _console(console)
    con.print(f"[bold]{report['stage_dir']}[/] iteration {report.get('iteration')}: {report['samples']} samples, "
              f"{report['tokens']} response tokens; {report['tokenizer']}")
    tab = Table(title="teachers vs student (per response token; KL(student||teacher) estimates)")
    for c in ("teacher", "weight", "mean log-prob", "KL k1", "KL k3", "mixture share"):
        tab.add_column(c, justify="right")
    for r in report["teachers"] + [report["combined"]] + ([dict(report["reference"], teacher="reference")]
                                                        if "reference" in report else []):
        tab.add_row(r["teacher"], _fmt(r.get("weight")), _fmt(r["mean_logp"]), _fmt(r["kl_k1"]),
                    _fmt(r["kl_k3"]), _fmt(r.get("mixture_share")))
    con.print(tab)
    rw, ln = report["rewards"], report["lengths"]
    con.print(f"behaviour mean log-prob (of the sampling model: the student, or the generating teacher offline) "
              f"{_fmt(report['student']['mean_behaviour_logp'])}; reward mean "
              f"{_fmt(rw['mean'])} (n={rw['count']}, missing {rw['missing']}); response length mean "
              f"{_fmt(ln['response']['mean'])} max {ln['response']['max']}; finish {ln['finish_reason']}")
    tab = Table(title="per domain")
    for c in ("domain", "samples", "tokens", "mean reward", "mean |b - T|"):
        tab.add_column(c, justify="right")
    for d in report["domains"]:
        tab.add_row(str(d["domain"]), str(d["samples"]), str(d["tokens"]), _fmt(d["mean_reward"]), _fmt(d["mean_abs_diff"]))
    con.print(tab)
    tab = Table(title="samples with the largest teacher/student disagreement (mean |b - T| per token)")
    for c in ("sample_id", "domain", "reward", "len", "mean |b - T|", "response"):
        tab.add_column(c)
    for s in report["top_samples"]:
        tab.add_row(s["sample_id"], str(s["domain"]), _fmt(s["reward"]), str(s["response_len"]),
                    _fmt(s["mean_abs_diff"]), s["response"] if s["response"] is not None else _ids(s["response_ids"]))
    con.print(tab)
    tab = Table(title="tokens with the largest disagreement |b - T|")
    for c in ("sample_id", "pos", "token", "context", "b", "T", "b - T"):
        tab.add_column(c)
    for t in report["top_tokens"]:
        tab.add_row(t["sample_id"], str(t["position"]), _tok(t["token"], t["token_id"]),
                    repr(t["context"]) if t["context"] is not None else "", _fmt(t["behaviour_logp"]),
                    _fmt(t["teacher_logp"]), _fmt(t["diff"]))
    con.print(tab)
    if report.get("filter"):
        _render_filter(con, report["filter"])
    s = report.get("sample")
    if s:
        names = list(s["tokens"][0]["teachers"]) if s["tokens"] else []
        tab = Table(title=f"sample {s['sample_id']} (domain {s['domain']}, reward {_fmt(s['reward'])}, "
                          f"{s['finish_reason']}); prompt: {s['prompt'] if s['prompt'] is not None else _ids(s['prompt_ids'])}")
        for c in ("pos", "token", "b", "T", *(f"T.{k}" for k in names), "b - T"):
            tab.add_column(c, justify="right")
        for t in s["tokens"]:
            tab.add_row(str(t["position"]), _tok(t["token"], t["token_id"]), _fmt(t["behaviour_logp"]),
                        _fmt(t["teacher_logp"]), *(_fmt(t["teachers"][k]) for k in names), _fmt(t["diff"]))
        con.print(tab)
        from opd_tasks.inspect_topk import render_topk
        render_topk(con, s)


def _render_filter(con, f: dict) -> None:
    from rich.table import Table

    con.print(f"[bold]offline filter[/] {f['filter']}: kept {f['kept']} of {f['rows']} rows, dropped {f['dropped']}")
    tab = Table(title="rows by reason")
    for c in ("reason", "rows"):
        tab.add_column(c)
    for why, n in f["reasons"].items():
        tab.add_row(why, str(n))
    con.print(tab)
    tab = Table(title="per domain")
    for c in ("domain", "kept", "dropped"):
        tab.add_column(c, justify="right")
    for d, v in f["by_domain"].items():
        tab.add_row(d, str(v["kept"]), str(v["dropped"]))
    con.print(tab)
    tab = Table(title="examples")
    for c in ("reason", "sample_id", "domain", "reward", "teacher logp/token", "len", "response"):
        tab.add_column(c)
    for why, rows in f["examples"].items():
        for r in rows:
            tab.add_row(why, r["sample_id"], str(r["domain"]), _fmt(r["reward"]), _fmt(r["teacher_logp_per_token"]),
                        str(r["response_len"]), r["response"] if r["response"] is not None else _ids(r["response_ids"]))
    con.print(tab)
