"""The `opd` command: one entry point for running, resuming, scoring and inspecting.

    opd demo                               # toy world, two teachers, a few minutes on a CPU
    opd toy build --out DIR                # build (or reuse) the toy world
    opd run configs/toy.yaml --run-dir R   # N iterations of rollout -> score -> train -> evaluate
    opd resume R                           # continue R where it stopped
    opd plan CONFIG [--gpus 8 --gpu-memory 80]   # where each stage runs; does it fit
    opd status R [--json]                  # per iteration, which stages are done
    opd inspect R --iteration 3 [--json]   # where teachers and student disagree
    opd inspect R --offline                # the offline phase: what was kept and dropped, and why
    opd inspect R --iteration 3 --html F   # the same as one self-contained HTML page, token by token
    opd recombine R --iteration 3 --weights a=0.3,b=0.7 --output O   # new weights, no re-scoring
    opd score CONFIG --input D --output O  # score an existing dataset offline
    opd generate CONFIG --model T --output O   # teacher T (or route) samples responses: rollout shards

Implementations are imported inside each command so that `opd --help` stays fast.

Errors: a user error (bad config, missing model path, tokenizer mismatch, bad input row, storage
full or unreachable, run directory held by another opd) prints one `error: ...` line and where the
full log is (OPD_LOG_DIR, default ~/.cache/opd/logs), exit code 2. Prefect's ERROR records (task
and flow tracebacks) go to that log only; `opd --debug ...` shows them and the traceback. A
programming error (anything else) prints its traceback, exit code 1.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer

class _Opd(typer.Typer):
    """The console entry (`opd`, `python -m flows.cli`): the commands, then a quick exit.

    After a run, the interpreter's own teardown (freeing every module and object of torch,
    transformers and Prefect) took ~2.5 s here, after everything was written. So once the command
    returns, the exit handlers run as usual (Prefect's log and event flush, its temporary server's
    stop, logging's flush), stdout and stderr are flushed, and os._exit skips the teardown. Every
    file opd writes is closed (and renamed into place) before its stage returns. A non-daemon thread
    still running is waited for, as at a normal exit. Typer's test runner calls the command, not
    this, so tests in one process are unaffected."""

    def __call__(self, *args, **kwargs):
        try:
            super().__call__(*args, **kwargs)
            code = 0
        except SystemExit as stop:
            code = stop.code
        exit_now(code)


def exit_now(code) -> None:
    """_Opd's quick exit (benchmarks time it too): the interpreter's own exit steps in its order, then
    os._exit(code) where it would tear the heap down. First threading's (Prefect drains its log and
    event workers there, and non-daemon threads are joined), then the atexit handlers (Prefect's
    loop threads, the temporary server's stop, logging's flush), then stdout and stderr."""
    import atexit
    import threading
    if isinstance(code, str):  # sys.exit("message"): printed, status 1, as the interpreter does
        print(code, file=sys.stderr)
        code = 1
    code = 0 if code is None else code
    threading._shutdown()  # what Py_Finalize runs first; after it no new thread can start
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or a reader that went away
            pass
    os._exit(code if isinstance(code, int) else 1)


app = _Opd(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
           help="opd: on-policy distillation from one or more teachers, orchestrated by Prefect.")
toy_app = typer.Typer(no_args_is_help=True, help="The toy world: tokenizer, tiny models and tasks, built offline.")
app.add_typer(toy_app, name="toy")


_state = {"debug": os.environ.get("OPD_DEBUG") == "1", "log": None}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show Prefect's error logs and tracebacks")) -> None:
    _state["debug"] = _state["debug"] or debug


class _BelowError(logging.Filter):
    """Console: no ERROR records, no "Finished in state Failed(<the error again>)" of each flow run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return False
        msg = record.msg if isinstance(record.msg, str) else ""
        return not msg.startswith(("Finished in state Failed", "Finished in state Crashed"))


def _capture_logs(command: str) -> None:
    """Everything Prefect (and opd) logs also goes to a file; unless --debug, the console handlers drop
    ERROR records (Prefect's tracebacks of a failed task/flow): the CLI prints the error once itself."""
    import prefect  # noqa: F401 - configures Prefect's logging, whose console handlers we filter
    root = Path(os.environ.get("OPD_LOG_DIR") or Path.home() / ".cache" / "opd" / "logs")
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"opd-{command}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{os.getpid()}.log"
        handler = logging.FileHandler(path, delay=True)
    except OSError:
        return  # no log file: the console still has the error line
    handler.setFormatter(logging.Formatter("%(asctime)s | %(levelname)-7s | %(name)s - %(message)s"))
    logging.getLogger().addHandler(handler)
    _state["log"] = path
    if _state["debug"]:
        return
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h is not handler:
                h.addFilter(_BelowError())


def _log_line() -> None:
    log = _state["log"]
    if log is not None and Path(log).exists():
        typer.echo(f"full log: {log}", err=True)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    _log_line()
    if _state["debug"]:
        traceback.print_exception(err)
    raise typer.Exit(2)


def _user_errors() -> tuple[type[Exception], ...]:
    from opd_tasks.config import ConfigError
    from opd_tasks.errors import OpdError
    # OSError: the storage or the machine (a disk, a network), not opd's code
    return (ConfigError, OpdError, OSError)


def _start_prefect_api():
    """Prefect's temporary server starts now, while the command imports (flows/prefect_api.py)."""
    from flows.prefect_api import start_temporary_api
    return start_temporary_api()


def _flow_command(command: str, call) -> None:
    """Run a command that starts Prefect flows: user errors in one line (exit 2), others with traceback."""
    _capture_logs(command)
    try:
        call()
    except _user_errors() as err:
        _fail(err)
    except Exception:
        _log_line()
        raise


@toy_app.command("build")
def toy_build(
    out: Path = typer.Option(..., "--out", help="directory of the world (reused when already built)"),
    size: str = typer.Option("demo", help="demo (the demo's world, ~5 min), test (seconds, for tests) or "
                                           "strong-to-weak (the demo's student; teachers grown from a larger base)"),
    seed: int = typer.Option(0, help="everything in the world is a function of this seed"),
    force: bool = typer.Option(False, help="rebuild even when a complete world is there"),
) -> None:
    """Build the toy world: tokenizer, prompt datasets, a weak student and one teacher per domain."""
    from opd_tasks.toy.world import build_world
    try:
        world_dir = build_world(out, size=size, seed=seed, force=force)
    except _user_errors() as err:
        _fail(err)
    world = json.loads((Path(world_dir) / "world.json").read_text())
    typer.echo(json.dumps(world.get("accuracy", {}), indent=2))
    typer.echo(f"world ready: {world_dir}")


@app.command()
def demo(
    run_dir: Optional[str] = typer.Option(None, help="where the run goes (default: runs/demo)"),
    iterations: Optional[int] = typer.Option(None, help="override the demo's iteration count"),
) -> None:
    """Distill a weak student from two domain teachers on the toy world; print a table, save plots."""
    ready = _start_prefect_api()
    from flows.demo import run_demo
    _flow_command("demo", lambda: (ready(), run_demo(run_dir=run_dir, iterations=iterations)))


@app.command()
def run(
    config: Path = typer.Argument(..., help="run config (YAML), e.g. configs/toy.yaml"),
    run_dir: Optional[str] = typer.Option(None, help="run directory (any fsspec URL); default from config"),
    iterations: Optional[int] = typer.Option(None, help="override the config's iteration count"),
    no_plan: bool = typer.Option(False, "--no-plan", help="skip the placement/memory check (`opd plan`)"),
) -> None:
    """Run the configured iterations; an existing run directory is resumed where it stands."""
    ready = _start_prefect_api()
    from flows.run import run_from_config
    from opd_tasks.engines.lifecycle import install_sigterm_handler
    install_sigterm_handler()  # SIGTERM ends the engines this run starts, then exits 143
    _flow_command("run", lambda: run_from_config(config, run_dir=run_dir, iterations=iterations,
                                                 plan_check=not no_plan, before_flow=ready))


@app.command()
def resume(
    run_dir: str = typer.Argument(..., help="run directory holding run.yaml"),
    iterations: Optional[int] = typer.Option(None, help="raise the total iteration count"),
    no_plan: bool = typer.Option(False, "--no-plan", help="skip the placement/memory check (`opd plan`)"),
) -> None:
    """Continue a stopped or failed run at the first stage that did not finish."""
    ready = _start_prefect_api()
    from flows.run import resume_run
    from opd_tasks.engines.lifecycle import install_sigterm_handler
    install_sigterm_handler()
    _flow_command("resume", lambda: (ready(), resume_run(run_dir, iterations=iterations, plan_check=not no_plan)))


@app.command()
def plan(
    config: Path = typer.Argument(..., help="run config (YAML)"),
    gpus: Optional[int] = typer.Option(None, help="GPUs per node (default: placement.gpus, else "
                                                  "train.nproc_per_node)"),
    gpu_memory: Optional[float] = typer.Option(None, "--gpu-memory", help="GiB per GPU (default: "
                                               "placement.gpu_memory_gib, else 80)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Where each stage's engines and the trainer run and the memory each needs; exits 1 naming the
    config field to change when a stage does not fit."""
    from opd_tasks.config import load_config
    from opd_tasks.placement import make_plan, render_plan
    try:
        cfg = load_config(config)
        if cfg.toy_world is not None:
            from opd_tasks.toy.world import resolve_config
            cfg = resolve_config(cfg)
        result = make_plan(cfg, gpus=gpus, gpu_memory_gib=gpu_memory)
    except _user_errors() as err:
        _fail(err)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else render_plan(result))
    if result.errors:
        raise typer.Exit(1)


@app.command()
def status(
    run_dir: str = typer.Argument(..., help="run directory"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Per iteration, each stage done / partial / missing, and the latest checkpoint."""
    from opd_tasks.render import render_status
    from opd_tasks.status import status_report
    try:
        report = status_report(run_dir)
    except _user_errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_status(report)


@app.command()
def inspect(
    run_dir: str = typer.Argument(..., help="run directory (or a directory holding scored/ shards)"),
    iteration: Optional[int] = typer.Option(None, help="iteration to inspect (default: latest scored)"),
    sample: Optional[str] = typer.Option(None, help="show this sample_id token by token"),
    top: int = typer.Option(5, help="how many most-disagreeing samples and tokens to list"),
    offline: bool = typer.Option(False, help="inspect the offline phase (what was kept and dropped)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    html: Optional[str] = typer.Option(None, "--html", help="write the stage as one self-contained HTML page here"),
    max_samples: int = typer.Option(200, min=1, help="--html: at most this many samples on the page"),
) -> None:
    """Where did teachers and student disagree? Per-teacher log-probs, KL estimates, rewards, tokens."""
    from opd_tasks.inspect import inspect_report
    from opd_tasks.render import render_inspect
    if html:
        from opd_tasks.inspect_html import write_html
        try:
            s = write_html(run_dir, html, iteration=iteration, offline=offline, max_samples=max_samples)
        except _user_errors() as err:
            _fail(err)
        typer.echo(f"wrote {html}: {s['shown']} of {s['samples']} samples of {s['stage_dir']}")
        return
    try:
        report = inspect_report(run_dir, iteration=iteration, sample=sample, top=top, offline=offline)
    except _user_errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render_inspect(report)


@app.command()
def recombine(
    run_dir: str = typer.Argument(..., help="run directory (or a scored stage directory)"),
    output: str = typer.Option(..., "--output", help="directory for the new scored stage"),
    iteration: Optional[int] = typer.Option(None, help="iteration whose scored stage to recombine (default: latest)"),
    weights: Optional[str] = typer.Option(None, help="NAME=WEIGHT per teacher, e.g. math=0.3,code=0.7 "
                                                     "(default: the stage's weights)"),
    mode: Optional[str] = typer.Option(None, help="mixture, product or route (default: the stage's combination)"),
    offline: bool = typer.Option(False, help="recombine the offline phase's scored stage"),
) -> None:
    """A new scored stage from the stored per-teacher log-probs with other weights or mode: no model runs."""
    from opd_tasks.recombine import parse_weights, recombine_stage
    try:
        res = recombine_stage(run_dir, output, iteration=iteration, mode=mode, offline=offline,
                              weights=parse_weights(weights) if weights is not None else None)
    except _user_errors() as err:
        _fail(err)
    typer.echo(json.dumps(res, indent=2))


@app.command()
def score(
    config: Path = typer.Argument(..., help="config naming the student (tokenizer) and the teachers"),
    input: str = typer.Option(..., "--input", help="Parquet/JSONL of prompts + responses (token ids or text)"),
    output: str = typer.Option(..., "--output", help="directory for the scored shards + manifest"),
) -> None:
    """Score an existing dataset with every teacher, offline, into scored Parquet shards."""
    from flows.score_dataset import score_dataset_from_cli
    _flow_command("score", lambda: score_dataset_from_cli(config, input_path=input, output=output))


@app.command()
def generate(
    config: Path = typer.Argument(..., help="config naming the student (tokenizer), the teachers and data.train"),
    model: str = typer.Option(..., "--model", help="teacher NAME that samples every prompt, or route (each "
                                                   "prompt by the teacher of its domain)"),
    output: str = typer.Option(..., "--output", help="directory for the rollout shards + manifest"),
    prompts: int = typer.Option(256, help="prompts drawn from data.train"),
    group_size: int = typer.Option(1, help="responses per prompt"),
    temperature: float = typer.Option(1.0, help="sampling temperature"),
    max_new_tokens: Optional[int] = typer.Option(None, help="default: the config's rollout.max_new_tokens"),
) -> None:
    """Sample responses with a teacher instead of the student: rollout shards with the teacher's
    behaviour log-probs and the verifier rewards (the offline phase's data, on its own)."""
    from flows.offline import generate_from_cli
    _flow_command("generate", lambda: generate_from_cli(config, output, model, prompts=prompts, group_size=group_size,
                                                        temperature=temperature, max_new_tokens=max_new_tokens))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
