"""Prefect's fixed cost per iteration, without any model: inside one parent flow (as opd_run), a
subflow of 4 no-op tasks (the shape of flows/iteration.py's opd_iteration) run with Prefect's
defaults, the same under flows.run.iteration_settings (what opd_run uses: no per-subflow heartbeat
thread), and the 4 tasks without a subflow; variants interleaved --repeat times. Prints one JSON object.

    .venv/bin/python benchmarks/bench_prefect.py [--repeat 8]

A fresh PREFECT_HOME and Prefect's temporary server, started (flows/prefect_api.py) and awaited
before anything is timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, log, machine, quiet_env, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=8)
    args = ap.parse_args()
    quiet_env()
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="opd-bench-prefect-")
    os.environ.pop("PREFECT_API_URL", None)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flows.prefect_api import start_temporary_api
    start_temporary_api()()

    from contextlib import nullcontext

    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.run import iteration_settings

    @task(cache_policy=NO_CACHE)
    def stage(run_dir: str, iteration: int) -> int:
        return iteration

    def stages(run_dir: str, iteration: int) -> list:
        return [stage(run_dir, iteration) for _ in range(4)]

    iteration = flow(name="bench-iteration", flow_run_name="iteration-{iteration:04d}")(stages)
    variants = {"subflow_prefect_default": (iteration, nullcontext), "subflow_opd": (iteration, iteration_settings),
                "tasks_only": (stages, nullcontext)}

    @flow(name="bench-run")
    def run() -> dict:
        secs: dict[str, list] = {v: [] for v in variants}
        for k in range(args.repeat):
            for name, (fn, settings) in variants.items():
                with settings():
                    t0 = time.perf_counter()
                    fn("unused", k)
                    secs[name].append(time.perf_counter() - t0)
            log(f"repeat {k}: " + ", ".join(f"{n} {s[-1]:.2f} s" for n, s in secs.items()))
        return secs

    secs = run()
    med = {n: statistics.median(s) for n, s in secs.items()}
    emit({"seconds_per_iteration_median": {n: round(v, 3) for n, v in med.items()},
          "seconds": {n: [round(x, 3) for x in s] for n, s in secs.items()},
          "saved_per_iteration_s": round(med["subflow_prefect_default"] - med["subflow_opd"], 3),
          "speedup_subflow_opd_vs_default": round(statistics.median(
              a / b for a, b in zip(secs["subflow_prefect_default"], secs["subflow_opd"])), 2),
          "repeat": args.repeat, "machine": machine(), "versions": versions("prefect")})


if __name__ == "__main__":
    main()
