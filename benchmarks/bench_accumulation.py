"""Gradient accumulation at 2 ranks (FSDP2, gloo on CPU): a reduce-scatter per micro-batch (the
default) vs one per mini-batch (train.no_sync_accumulation). Prints one JSON object.

    .venv/bin/python benchmarks/bench_accumulation.py              # ~2-4 min on 2 busy cores
    .venv/bin/python benchmarks/bench_accumulation.py --micro 16 --hidden 512

Both variants run in the same two processes (mp.spawn), interleaved --repeat times, on the same
rows: --steps optimizer steps of --micro micro-batches per rank (--rows-per-micro rows of --seq
tokens each). Step time = the loop's per-step "seconds" (forward, backward, reduce-scatters, clip,
AdamW); the first step of each run is dropped (one-time costs); the figure is the median over
repeats of the per-repeat ratio sync / no-sync.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, llama_config, log, machine, quiet_env, save_llama, versions  # noqa: E402


def _rows(n: int, seq: int, vocab: int, seed: int = 0):
    import torch

    from opd_tasks.trainer.batching import Rows
    g = torch.Generator().manual_seed(seed)
    prompt = seq // 4
    ids = [torch.randint(3, vocab, (seq,), generator=g) for _ in range(n)]
    return Rows(input_ids=ids, start=torch.full((n,), prompt), response_len=torch.full((n,), seq - prompt),
                token={"teacher_logp": [-torch.rand(seq - prompt, generator=g) * 3 for _ in range(n)]},
                rewards=torch.full((n,), float("nan")), prompt_ids=[f"p{i}" for i in range(n)])


def worker(rank: int, a, model_dir: str, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    quiet_env()
    import torch
    from transformers import AutoModelForCausalLM

    from opd_tasks.losses import LossParams
    from opd_tasks.trainer.distributed import close_distributed, init_distributed, shard_model
    from opd_tasks.trainer.loop import LoopConfig, train_iteration

    torch.set_num_threads(1)
    d = init_distributed("cpu")
    n = a.steps * 2 * a.micro * a.rows_per_micro
    res: dict[str, list] = {"sync": [], "no_sync": []}
    try:
        for r in range(a.repeat):
            for name in ("sync", "no_sync"):
                rows = _rows(n, a.seq, a.vocab, seed=r)
                model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), d.mesh)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
                loop = LoopConfig(mini_batches=a.steps, micro_batch_tokens=a.rows_per_micro * a.seq,
                                  no_sync=name == "no_sync")
                out_it = train_iteration(model, opt, rows, LossParams(kind="rkl", tis_cap=None), loop, d.device)
                res[name].append([s["seconds"] for s in out_it["steps"]][1:])
                if rank == 0:
                    log(f"bench_accumulation: repeat {r} {name}: {[round(x, 3) for x in res[name][-1]]}")
        if rank == 0:
            import json
            res["params"] = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
            Path(out).write_text(json.dumps(res))
    finally:
        close_distributed(d)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro", type=int, default=8, help="micro-batches per rank per optimizer step")
    p.add_argument("--rows-per-micro", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    quiet_env()
    import json

    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory(prefix="opd-bench-acc-") as tmp:
        save_llama(tmp, llama_config(a.vocab, a.hidden, a.layers, a.heads))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = os.path.join(tmp, "res.json")
        mp.start_processes(worker, args=(a, tmp, port, out), nprocs=2, start_method="spawn")
        res = json.loads(Path(out).read_text())
    med = {k: [statistics.median(x) for x in res[k]] for k in ("sync", "no_sync")}
    ratios = [s / n for s, n in zip(med["sync"], med["no_sync"])]
    emit({"benchmark": "accumulation", "world_size": 2, "backend": "gloo", "device": "cpu", "params": res.pop("params"),
          "micro_batches_per_step": a.micro, "tokens_per_micro_batch": a.rows_per_micro * a.seq,
          "steps_timed_per_repeat": a.steps - 1, "repeat": a.repeat,
          "sync_step_s": round(min(med["sync"]), 4), "no_sync_step_s": round(min(med["no_sync"]), 4),
          "speedup_no_sync": round(statistics.median(ratios), 3),
          "time_saved_fraction": round(1 - 1 / statistics.median(ratios), 3),
          "per_repeat_ratios": [round(r, 3) for r in ratios],
          "machine": machine(), "versions": versions("torch", "transformers")})


if __name__ == "__main__":
    main()
