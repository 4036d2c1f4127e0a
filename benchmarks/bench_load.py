"""Peak host memory per rank when the trainer loads the student at 2 ranks: today's load (every rank
from_pretrained's the full model, then FSDP2 shards it) vs lean loading (opd_tasks.models.
load_for_training: meta-device build, FSDP2 sharding, each rank reads only its rows).

    .venv/bin/python benchmarks/bench_load.py [--hidden 1024 --layers 12 --vocab 32000]

Each variant runs in 2 fresh processes (gloo, one torch thread) that load the same safetensors
model; per rank: peak RSS (VmHWM), and the peaks of anonymous memory (RssAnon: the process's own)
and of mapped file pages (RssFile: safetensors mmapped by from_pretrained), sampled every 2 ms,
each also minus the value right before the load (after imports). The full state dicts of both variants are compared
(bitwise). Prints one JSON object; results/load_memory.json.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import threading
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _common import emit, llama_config, log, machine, quiet_env, save_llama  # noqa: E402


def _status() -> dict[str, float]:
    """VmRSS, VmHWM (peak RSS of this process image), RssAnon, RssFile in MB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) / 1024
    return out


class _Peak(threading.Thread):
    """Peaks of RssAnon (the process's own memory) and RssFile (mapped file pages), sampled every 2 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        s = _status()
        self.anon, self.file, self.stop = s["RssAnon"], s["RssFile"], threading.Event()

    def run(self):
        while not self.stop.is_set():
            s = _status()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            time.sleep(0.002)


def _rank(rank: int, variant: str, path: str, init: str, out: str) -> None:
    import json

    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from opd_tasks.models import load_for_training
    from opd_tasks.trainer.checkpoint import full_state_dict
    from opd_tasks.trainer.distributed import init_distributed, shard_model
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    d = init_distributed("cpu")
    dist.barrier()
    before = _status()
    peak = _Peak()
    peak.start()
    t0 = time.perf_counter()
    if variant == "today":  # what worker.build_model did before lean loading
        model = shard_model(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), d.mesh)
    else:
        model = load_for_training(path, "float32", prepare=lambda m: shard_model(m, d.mesh))
    seconds = time.perf_counter() - t0
    dist.barrier()
    peak.stop.set()
    peak.join()
    after = _status()
    row = {"rank": rank, "seconds": round(seconds, 3), "rss_before_load_mb": round(before["VmRSS"], 1),
           "peak_rss_mb": round(after["VmHWM"], 1), "rss_after_load_mb": round(after["VmRSS"], 1),
           "peak_anon_mb": round(peak.anon, 1), "anon_before_load_mb": round(before["RssAnon"], 1),
           "peak_file_mapped_mb": round(peak.file, 1), "file_mapped_before_load_mb": round(before["RssFile"], 1)}
    full = full_state_dict(model)
    if rank == 0:
        h = hashlib.sha256()
        for k in sorted(full):
            h.update(k.encode())
            h.update(full[k].contiguous().view(torch.uint8).numpy().tobytes())
        row["state_sha256"] = h.hexdigest()
    with open(f"{out}.{rank}", "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def run_variant(variant: str, path: str, tmp: str) -> list[dict]:
    import json
    out = os.path.join(tmp, variant)
    store = os.path.join(tmp, f"store-{variant}-{time.time_ns()}")
    mp.spawn(_rank, args=(variant, path, f"file://{store}", out), nprocs=2, join=True)
    rows = [json.load(open(f"{out}.{r}")) for r in range(2)]
    for r in rows:
        r["peak_rss_minus_before_mb"] = round(r["peak_rss_mb"] - r["rss_before_load_mb"], 1)
        r["peak_anon_minus_before_mb"] = round(r["peak_anon_mb"] - r["anon_before_load_mb"], 1)
        r["peak_file_mapped_minus_before_mb"] = round(r["peak_file_mapped_mb"] - r["file_mapped_before_load_mb"], 1)
    return rows


def main() -> None:
    quiet_env()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="opd-bench-load-") as tmp:
        cfg = llama_config(args.vocab, args.hidden, args.layers, args.heads)
        path = str(save_llama(os.path.join(tmp, "model"), cfg))
        n = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        log(f"model: {n / 2**20:.0f} MB of float32 safetensors")
        result = {}
        for variant in ("today", "lean"):  # memory is deterministic: one run each
            log(f"{variant} ...")
            result[variant] = run_variant(variant, path, tmp)
    today, lean = result["today"], result["lean"]
    def ratio(key):
        worst = max(r[key] for r in lean)
        return round(max(r[key] for r in today) / worst, 2) if worst > 0 else None
    emit({"benchmark": "load_memory", "ranks": 2, "weights_mb": round(n / 2**20, 1),
          "config": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab, "heads": args.heads},
          "today": today, "lean": lean,
          "peak_rss_ratio_today_over_lean": ratio("peak_rss_mb"),
          "peak_rss_increase_ratio_today_over_lean": ratio("peak_rss_minus_before_mb"),
          "peak_anon_increase_ratio_today_over_lean": ratio("peak_anon_minus_before_mb"),
          "peak_file_mapped_increase_today_mb": max(r["peak_file_mapped_minus_before_mb"] for r in today),
          "peak_file_mapped_increase_lean_mb": max(r["peak_file_mapped_minus_before_mb"] for r in lean),
          "weights_identical": today[0]["state_sha256"] == lean[0]["state_sha256"],
          "machine": machine()})


if __name__ == "__main__":
    main()
