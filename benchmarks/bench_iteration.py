"""One full toy-world iteration through `opd run` (Prefect flow, hf engines, in-process trainer):
per-stage wall time, model-load time per stage, and the fixed overhead as a fraction of the
iteration; bytes per response token per teacher of the scored shards. Prints one JSON object.

    .venv/bin/python benchmarks/bench_iteration.py                 # demo scale (configs/toy.yaml), ~2-3 min
    .venv/bin/python benchmarks/bench_iteration.py --iterations 3  # more warm iterations
    .venv/bin/python benchmarks/bench_iteration.py --size test     # the small test world
    .venv/bin/python benchmarks/bench_iteration.py --prefect-server --prompts 512   # production-like

The toy world is built (or reused from its cache) before anything is timed. The run itself goes
in a fresh process, exactly like `opd run configs/toy.yaml --iterations N` with an empty
PREFECT_HOME (so Prefect starts its temporary server, as a first `opd run` does); that process
times itself by wrapping opd's functions (no opd code is changed).

Definitions:
- compute = the model math inside the stages: rollout generation (HFGenerator.generate), teacher
  scoring (HFScorer.score), training (train_iteration: old_t recompute + optimizer steps) and
  evaluation decoding (the rollout engine's HFGenerator.generate at temperature 0, including the
  once-per-run baseline of the initial student and the teachers, which runs inside iteration 0's
  eval stage; "eval_generate" is the part of "generate" inside the eval stage).
- overhead = iteration wall time - compute. It is broken into: process start (interpreter) and
  imports, Prefect (flow/task-run orchestration, its temporary server's start and stop, summaries
  and artifacts: everything outside the stages), model loading (per stage; the rollout's includes
  its tokenizer load, whose first call imports transformers' tokenizer code), Parquet I/O (shard
  writes/reads), checkpoint save (DCP train state + HF export) and other (tokenizing, verifiers,
  manifests, ... the rest of each stage).
- the cold iteration is iteration 0 of a fresh process (+ process exit): what `opd run
  --iterations 1` costs. A warm iteration is a later one in the same process (engines stay
  loaded, the Prefect server is up, the baseline is done): the per-iteration cost of `opd demo`.
overhead_fraction is the cold iteration's; overhead_fraction_warm the mean of the warm ones;
overhead_fraction_run is measured on the whole run of --iterations (a short run): 1 - the sum of
the stages' seconds (rollout, scored, train, eval: each task's stage function) / the wall time of
run_config's iteration loop (the first iteration's start to the end of the last one's summary and
artifacts), the issue's definition; overhead_fraction_run_estimate = 1 cold + (config iterations - 1)
warm ones, a whole `opd demo` extrapolated.
"""
from __future__ import annotations

import time

T_MAIN = time.time()  # first thing: the process start is measured up to here

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, log, machine, quiet_env, versions  # noqa: E402

COMPUTE = ("generate", "score", "train_steps", "eval_generate")
STAGES = ("rollout", "scored", "train", "eval")


class Clock:
    """Seconds per (iteration, category) of wrapped functions; `it` is the current iteration."""

    def __init__(self):
        self.it = "setup"
        self.stage: str | None = None  # the stage running now (leaves are also booked under it)
        self.acc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.marks: dict[str, float] = {}

    def wrap(self, owner, name: str, cat: str, it_from_arg: bool = False, mark: bool = False):
        fn = getattr(owner, name)
        label = f"calls:{getattr(owner, '__name__', owner)}.{name}"

        @functools.wraps(fn)
        def timed(*a, **kw):
            if it_from_arg:  # flows.run's opd_iteration(run_dir, n): a new iteration starts
                self.it = f"iter{a[1]}"
                self.marks[self.it] = time.time()
            if mark:
                self.marks.setdefault(cat, time.time())
            outer = self.stage
            if cat.startswith("stage:"):
                self.stage = cat[6:]
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                dt = time.perf_counter() - t0
                self.stage = outer
                self.acc[self.it][cat] += dt
                self.acc[self.it][label] += 1  # how often: warm iterations must not reload engines
                if outer and cat != "baseline_eval":
                    self.acc[self.it][f"in:{outer}:{cat}"] += dt
        setattr(owner, name, timed)


def instrument(clock: Clock) -> None:
    """Wrap opd's stage, model-load, compute and I/O functions (module attributes looked up at call time)."""
    import flows.run
    import opd_tasks.eval_stage as ev
    import opd_tasks.rollout as rollout
    import opd_tasks.scoring as scoring
    import opd_tasks.stages as stages
    import opd_tasks.trainer.stage as tstage
    import opd_tasks.trainer.worker as worker
    import storage.shards as shards
    from opd_tasks.engines.hf import HFGenerator, HFScorer

    clock.wrap(flows.run, "opd_iteration", "iteration", it_from_arg=True)
    clock.wrap(flows.run, "run_config", "run_config", mark=True)
    progress = flows.run.update_progress_artifact  # the last statement of run_config's iteration loop

    def loop_mark(*a, **kw):
        try:
            return progress(*a, **kw)
        finally:
            clock.marks["loop_end"] = time.time()
    flows.run.update_progress_artifact = loop_mark
    for mod, fn, stage in ((rollout, "run_rollout", "rollout"), (scoring, "run_scoring", "scored"),
                           (tstage, "run_training", "train"), (ev, "run_evaluation", "eval")):
        clock.wrap(mod, fn, "stage:" + stage)
    clock.wrap(ev, "read_baseline", "baseline_eval")
    # model loads, per stage
    clock.wrap(HFGenerator, "__init__", "load:rollout")
    clock.wrap(HFGenerator, "load_weights", "load:rollout")  # warm iterations: the new weights, in place
    clock.wrap(rollout, "load_tokenizer", "load:rollout")  # the first call also imports AutoTokenizer
    clock.wrap(HFScorer, "__init__", "load:scored")
    clock.wrap(worker, "build_model", "load:train")
    # compute
    clock.wrap(HFGenerator, "generate", "generate")
    clock.wrap(HFScorer, "score", "score")
    clock.wrap(HFScorer, "score_topk", "score")  # scoring.top_k (the demo config); both call _score once
    clock.wrap(worker, "train_iteration", "train_steps")
    # Parquet I/O and checkpoints
    clock.wrap(stages, "write_part", "parquet_io")  # every stage's parts go through stages.write_stage
    clock.wrap(scoring, "read_part", "parquet_io")
    clock.wrap(shards, "read_stage", "parquet_io")  # imported inside the trainer's load_rows
    clock.wrap(worker, "save_checkpoint", "checkpoint_save")


def child(args) -> None:
    """The timed process: `opd run` of the config for --iterations, instrumented; JSON to stdout."""
    t_start = time.time()
    quiet_env()
    try:  # as `opd run` does (flows/cli.py): Prefect's temporary server starts during the imports
        from flows.prefect_api import start_temporary_api
    except ImportError:  # an opd from before flows/prefect_api.py (a side-by-side baseline)
        start_temporary_api = None
    ready = start_temporary_api() if start_temporary_api else (lambda: None)
    import torch
    torch.set_num_threads(args.threads)
    from flows.run import opd_run
    t_imports = time.time()
    clock = Clock()
    instrument(clock)
    t0 = time.time()
    ready()
    opd_run(args.config, run_dir=args.run_dir, iterations=args.iterations)
    t_end = time.time()
    emit({"t_main": T_MAIN, "t_start": t_start, "t_imports": t_imports, "t_flow_call": t0, "t_end": t_end,
          "marks": clock.marks, "acc": {k: dict(v) for k, v in clock.acc.items()}})
    try:  # as the `opd` command exits (flows/cli.py): exit handlers, then no interpreter teardown
        from flows.cli import exit_now
    except ImportError:  # an opd from before the quick exit (a side-by-side baseline)
        return
    exit_now(0)


def scored_bytes(run_dir: Path, iteration: int, teachers: int) -> dict:
    """Bytes of the scored stage's Parquet parts per response token per teacher (the whole file:
    ids, behaviour and combined log-probs included), and the compressed bytes of the
    teacher_logp.NAME columns alone per response token per teacher (the marginal cost of a teacher)."""
    import pyarrow.parquet as pq

    parts = sorted((run_dir / f"iter-{iteration:06d}" / "scored").glob("part-*.parquet"))
    total = sum(p.stat().st_size for p in parts)
    tokens, teacher_cols = 0, 0
    for p in parts:
        f = pq.ParquetFile(p)
        tokens += sum(len(r) for r in f.read(columns=["response_ids"]).column(0).to_pylist())
        md = f.metadata
        for g in range(md.num_row_groups):
            for c in range(md.num_columns):
                col = md.row_group(g).column(c)
                path = col.path_in_schema  # "teacher_logp.NAME.list.element"; the combined one has no NAME
                if path.startswith("teacher_logp.") and path.count(".") > 2:
                    teacher_cols += col.total_compressed_size
    per = max(tokens, 1) * teachers
    return {"scored_bytes": total, "response_tokens": tokens,
            "bytes_per_token_per_teacher": round(total / per, 2),
            "teacher_column_bytes_per_token": round(teacher_cols / per, 2)}


def summarize(res: dict, launch: float, done: float, iterations: int) -> list[dict]:
    """Per iteration: wall, compute, overhead and its parts (see the module docstring)."""
    acc, marks = res["acc"], res["marks"]
    starts = [marks[f"iter{n}"] for n in range(iterations)]
    ends = starts[1:] + [res["t_end"]]
    rows = []
    for n in range(iterations):
        a = acc.get(f"iter{n}", {})
        wall = ends[n] - starts[n]
        inside = sum(a.get("stage:" + s, 0.0) for s in STAGES)
        overhead: dict = {}
        if n == 0:  # the cold iteration carries the process: start, imports, Prefect start, exit
            overhead = {"process_start": res["t_main"] - launch, "imports": res["t_imports"] - res["t_main"],
                        "prefect_start": marks["run_config"] - res["t_flow_call"],
                        "run_setup": starts[0] - marks["run_config"], "process_exit": done - res["t_end"]}
            wall += starts[0] - launch - (res["t_flow_call"] - res["t_imports"]) + overhead["process_exit"]
        overhead["prefect_flow_and_tasks"] = a.get("iteration", 0.0) - inside
        overhead["summary_and_artifacts"] = ends[n] - starts[n] - a.get("iteration", 0.0)
        a["eval_generate"] = a.get("in:eval:generate", 0.0)  # evaluation decodes on the rollout engine
        a["generate"] = a.get("generate", 0.0) - a["eval_generate"]
        compute = sum(a.get(k, 0.0) for k in COMPUTE)
        overhead["model_load"] = {s: a.get("load:" + s, 0.0) for s in STAGES}
        overhead["model_load"]["eval"] = a.get("in:eval:load:rollout", 0.0)  # eval's engines are rollout's kind
        overhead["model_load"]["rollout"] -= overhead["model_load"]["eval"]
        overhead["parquet_io"] = a.get("parquet_io", 0.0)
        overhead["checkpoint_save"] = a.get("checkpoint_save", 0.0)
        overhead["other_in_stage"] = {  # the stage's wall minus the timed parts inside it
            s: a.get("stage:" + s, 0.0) - sum(v for k, v in a.items() if k.startswith(f"in:{s}:"))
            for s in STAGES}
        rows.append({"iteration": n, "wall_s": wall, "compute_s": compute, "overhead_s": wall - compute,
                     "overhead_fraction": round(1 - compute / wall, 3),
                     "stages_s": {s: a.get("stage:" + s, 0.0) for s in STAGES},
                     "compute": {k: a.get(k, 0.0) for k in COMPUTE},
                     "baseline_eval_s": a.get("baseline_eval", 0.0), "overhead": overhead,
                     "loads": {k[6:]: int(v) for k, v in a.items()
                               if k.startswith("calls:") and ("__init__" in k or "load" in k or "build_model" in k)}})
    return _round(rows)


def _round(obj):
    if isinstance(obj, float):
        return round(obj, 2)
    if isinstance(obj, dict):
        return {k: v if k == "overhead_fraction" else _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def start_prefect_server(env: dict, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`prefect server start` on a free loopback port, in its own process group; (process, API URL)."""
    import socket
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    prefect = str(Path(sys.executable).with_name("prefect"))
    proc = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit(f"prefect server did not answer on {url} within {timeout} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "toy.yaml"))
    ap.add_argument("--size", choices=("demo", "test"), default=None,
                    help="toy world size (default: the config's; test uses ~/.cache/opd/toy-test)")
    ap.add_argument("--iterations", type=int, default=2, help="iteration 0 is cold, the rest warm")
    ap.add_argument("--prompts", type=int, help="rollout.prompts_per_iteration (default: the config's)")
    ap.add_argument("--group-size", type=int, help="rollout.group_size (default: the config's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--keep", help="keep the run directory here (default: a temporary one)")
    ap.add_argument("--prefect-server", action="store_true",
                    help="run against a `prefect server start` started beforehand (not timed), as in "
                         "production, instead of Prefect's temporary per-process server")
    ap.add_argument("--existing-prefect-db", action="store_true",
                    help="the run's PREFECT_HOME already holds a database (any `opd run` after the first one "
                         "on a machine); default: an empty one, as the very first run (Prefect migrates it)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    quiet_env()
    import yaml

    from opd_tasks.config import load_config
    from opd_tasks.toy.world import build_world

    cfg = load_config(args.config)
    if args.size and cfg.toy_world and args.size != cfg.toy_world.size:
        tw = {"dir": str(Path(cfg.toy_world.dir).expanduser()) + f"-{args.size}", "size": args.size}
        cfg = cfg.model_copy(update={"toy_world": cfg.toy_world.model_copy(update=tw)})
    rollout = {k: v for k, v in (("prompts_per_iteration", args.prompts), ("group_size", args.group_size)) if v}
    # iterations only: the demo config's offline phase (a warm start before iteration 0) is not one
    cfg = cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update=rollout), "offline": None})
    t0 = time.time()
    if cfg.toy_world:
        import torch
        torch.set_num_threads(args.threads)
        build_world(Path(cfg.toy_world.dir).expanduser(), size=cfg.toy_world.size, seed=cfg.toy_world.seed)
    world_s = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="opd-bench-iteration-") as tmp:
        run_dir = Path(args.keep or tmp) / "run"
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True)))
        # a busy machine needs more than Prefect's default 20 s to start its temporary server
        env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", **os.environ,
               "PREFECT_HOME": str(Path(tmp) / "prefect"), "OMP_NUM_THREADS": str(args.threads)}
        env.pop("PREFECT_API_URL", None)
        if args.existing_prefect_db:  # a later `opd run`: the database is there (migrated once, untimed)
            subprocess.run([sys.executable, "-c", "from flows.prefect_api import start_temporary_api; "
                            "start_temporary_api()()"], env=env, cwd=ROOT, check=True, capture_output=True)
        server = start_prefect_server(env) if args.prefect_server else None
        if server:
            env["PREFECT_API_URL"] = server[1]
        cmd = [sys.executable, __file__, "--child", "--config", str(cfg_path), "--run-dir", str(run_dir),
               "--iterations", str(args.iterations), "--threads", str(args.threads)]
        try:
            launch = time.time()
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            done = time.time()
        finally:
            if server:
                os.killpg(server[0].pid, signal.SIGKILL)
                server[0].wait()
        if proc.returncode != 0:
            log(proc.stderr[-5000:])
            raise SystemExit(f"the timed run failed (exit code {proc.returncode})")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = summarize(res, launch, done, args.iterations)
        size = scored_bytes(run_dir, 0, len(cfg.teachers))
    warm = rows[1:]
    # the whole run's loop, measured: first iteration's start to the end of the last one's summary
    loop_s = res["marks"]["loop_end"] - res["marks"]["iter0"]
    stage_s = sum(sum(r["stages_s"].values()) for r in rows)
    n_run = cfg.iterations  # what a whole run of the config costs: one cold iteration + (N-1) warm ones
    est = None
    if warm:
        w_wall = sum(r["wall_s"] for r in warm) / len(warm)
        w_comp = sum(r["compute_s"] for r in warm) / len(warm)
        est = round(1 - (rows[0]["compute_s"] + (n_run - 1) * w_comp) / (rows[0]["wall_s"] + (n_run - 1) * w_wall), 3)
    emit({
        "overhead_fraction": rows[0]["overhead_fraction"],
        "overhead_fraction_warm": round(sum(r["overhead_fraction"] for r in warm) / len(warm), 3) if warm else None,
        "overhead_fraction_run": round(1 - stage_s / loop_s, 3),
        "run_loop_wall_s": round(loop_s, 2), "run_stage_s": round(stage_s, 2), "iterations_run": args.iterations,
        "overhead_fraction_run_estimate": est, "run_iterations": n_run,
        **{k: v for k, v in size.items()},
        "stages_s": rows[0]["stages_s"], "wall_s": rows[0]["wall_s"], "compute_s": rows[0]["compute_s"],
        "iterations": rows, "process_wall_s": round(done - launch, 2),
        "scale": {"world": cfg.toy_world.size if cfg.toy_world else None,
                  "prompts": cfg.rollout.prompts_per_iteration, "group_size": cfg.rollout.group_size,
                  "max_new_tokens": cfg.rollout.max_new_tokens, "teachers": len(cfg.teachers),
                  "eval_prompts": cfg.eval.max_prompts, "threads": args.threads},
        "prefect": "server started beforehand" if args.prefect_server else "temporary per-process server",
        "prefect_db": "existing" if args.existing_prefect_db else "fresh (first run: Prefect migrates it)",
        "world_build_or_reuse_s": round(world_s, 1),
        "machine": machine(), "versions": versions("torch", "transformers", "prefect", "pyarrow"),
    })


if __name__ == "__main__":
    main()
