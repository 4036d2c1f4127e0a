"""Teacher compute per iteration under scoring.teachers: routed vs all, on the toy world's two
routed domain teachers (configs/toy.yaml): teacher tokens scored per response token, and the
scoring stage's wall time (interleaved, best of --repeats, one torch thread). Prints one JSON object.

    .venv/bin/python benchmarks/bench_pipeline.py                  # demo world, 256 prompts x 4
    .venv/bin/python benchmarks/bench_pipeline.py --size test      # the small test world

One rollout stage is sampled once; each repeat scores it into a fresh scored stage under each
mode. Streaming (scoring part p while rollout makes part p+1) is not built yet, so this script
does not report a streaming_speedup.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, log, machine, quiet_env, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("demo", "test"), default="demo")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    quiet_env()
    import pyarrow.compute as pc
    import torch
    import yaml

    import opd_tasks.scoring as scoring
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.rollout import run_rollout
    from storage.shards import read_stage

    torch.set_num_threads(args.threads)
    raw = yaml.safe_load((ROOT / "configs" / "toy.yaml").read_text())
    raw["toy_world"]["size"] = args.size
    if args.size == "test":  # the tests' cached world, not the demo's directory
        raw["toy_world"]["dir"] = str(ROOT / ".cache" / "opd-test" / "toy-test-seed0")
    raw["rollout"]["prompts_per_iteration"] = args.prompts
    tmp = Path(tempfile.mkdtemp(prefix="opd-bench-pipeline-"))
    counted = {"tokens": 0}
    real_get = scoring.get_scorers

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def score(self, prompts, responses):
            counted["tokens"] += sum(len(r) for r in responses)
            return self.inner.score(prompts, responses)

    scoring.get_scorers = lambda *a, **k: {n: Counting(s) for n, s in real_get(*a, **k).items()}
    try:
        ctxs = {m: prepare_run(parse_config({**raw, "scoring": {**raw["scoring"], "teachers": m}}), str(tmp / m))
                for m in ("routed", "all")}
        t0 = time.perf_counter()
        run_rollout(ctxs["routed"], 0)
        log(f"rollout: {time.perf_counter() - t0:.1f} s")
        src = ctxs["routed"].stage_dir(0, "rollout")
        shutil.copytree(src, ctxs["all"].stage_dir(0, "rollout"))
        table = read_stage(ctxs["routed"].layout.fs, src)
        response_tokens = int(pc.sum(pc.list_value_length(table.column("response_ids"))).as_py())
        for m in ctxs:  # load the teachers before anything is timed
            scoring.get_scorers(ctxs[m].cfg, False, ctxs[m].reference_path)
        seconds = {m: [] for m in ctxs}
        per_token = {}
        for rep in range(args.repeats):
            for m, ctx in ctxs.items():
                shutil.rmtree(ctx.stage_dir(0, "scored"), ignore_errors=True)
                counted["tokens"] = 0
                t0 = time.perf_counter()
                scoring.run_scoring(ctx, 0)
                seconds[m].append(time.perf_counter() - t0)
                per_token[m] = counted["tokens"] / response_tokens
                log(f"repeat {rep} {m}: {seconds[m][-1]:.2f} s, {per_token[m]:.3f} teacher tokens per response token")
    finally:
        scoring.get_scorers = real_get
        shutil.rmtree(tmp, ignore_errors=True)
    best = {m: min(v) for m, v in seconds.items()}
    emit({"benchmark": "pipeline", "world": args.size, "samples": table.num_rows, "response_tokens": response_tokens,
          "teachers": 2, "threads": args.threads, "repeats": args.repeats,
          "teacher_tokens_per_response_token_routed": per_token["routed"],
          "teacher_tokens_per_response_token_all": per_token["all"],
          "scoring_seconds_routed": round(best["routed"], 3), "scoring_seconds_all": round(best["all"], 3),
          "scoring_speedup_routed": round(best["all"] / best["routed"], 3),
          "streaming_speedup": None, "machine": machine(), "versions": versions(),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})


if __name__ == "__main__":
    main()
