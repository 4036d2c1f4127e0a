"""Peak memory of the trainer's log-prob step (student forward -> response log-probs -> backward):
full [tokens, vocab] float32 logits vs the chunked output layer (train.logp_chunk_tokens) vs chunked
with activation checkpointing (train.activation_checkpointing). Prints one JSON object.

    .venv/bin/python benchmarks/bench_memory.py                    # 150k vocab, 16k tokens (~40 GB for "full")
    .venv/bin/python benchmarks/bench_memory.py --tokens 4096      # what fits a 24 GB machine

Model: a tiny random Llama (hidden 64, 1 layer) with Qwen3's vocabulary size (151936), so the
output layer dominates, as it does for the log-prob step of a real student at long context.
Batch: --tokens split into rows of --row-len (prompt --prompt-len, the rest response). Each variant
runs in a fresh process (the same opd code: opd_tasks.trainer.loop.response_logp). Peak = on a
GPU torch.cuda.max_memory_allocated() - allocated before the step; on CPU the peak resident set
(VmHWM, reset through /proc/self/clear_refs before the step) - resident set before the step
(tracemalloc cannot see torch's allocations). Large tensors are mmap'ed by glibc, so freed
memory leaves the resident set at once and VmHWM is the step's own high-water mark.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, emit, llama_config, log, machine, quiet_env, run_json, save_llama, versions  # noqa: E402

VARIANTS = {"full": (0, False), "chunked": (None, False), "chunked_checkpointed": (None, True)}


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def child(a) -> None:
    """One variant in this process: build, then measure one forward + backward of the log-probs."""
    quiet_env()
    import torch
    from transformers import AutoModelForCausalLM

    from opd_tasks.trainer.distributed import enable_activation_checkpointing
    from opd_tasks.trainer.loop import response_logp

    torch.set_num_threads(a.threads)
    chunk, ckpt = VARIANTS[a.child]
    chunk = a.chunk if chunk is None else chunk
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    if ckpt:
        enable_activation_checkpointing(model)
    model = model.to(dev).train()
    rows = a.tokens // a.row_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (rows, a.row_len), generator=g)
    mb = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "start": torch.full((rows,), a.prompt_len),
          "response_len": torch.full((rows,), a.row_len - a.prompt_len)}
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    t0 = time.perf_counter()
    logp = response_logp(model, mb, dev, chunk)
    logp.sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _status_mb("VmHWM") - base
    print(json.dumps({"peak_mb": round(peak, 1), "seconds": round(time.perf_counter() - t0, 3),
                      "device": dev.type, "logp_sum": float(logp.detach().sum()),
                      "lm_head_grad_norm": float(model.lm_head.weight.grad.norm())}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="tokens in the micro-batch (rows x row-len)")
    p.add_argument("--row-len", type=int, default=1024)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--chunk", type=int, default=1024, help="train.logp_chunk_tokens of the chunked variants")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(a)
    quiet_env()
    out = {"benchmark": "memory", "tokens": a.tokens, "row_len": a.row_len, "prompt_len": a.prompt_len,
           "response_tokens": (a.tokens // a.row_len) * (a.row_len - a.prompt_len), "vocab": a.vocab,
           "chunk_tokens": a.chunk, "threads": a.threads, "machine": machine(), "versions": versions("torch", "transformers")}
    with tempfile.TemporaryDirectory(prefix="opd-bench-mem-") as tmp:
        cfg = llama_config(a.vocab, hidden=64, layers=1, heads=2, max_len=max(a.row_len, 128))
        save_llama(tmp, cfg)
        res = {}
        for v in a.variants.split(","):
            log(f"bench_memory: {v} ...")
            cmd = [sys.executable, __file__, "--child", v, "--model-dir", tmp, "--tokens", str(a.tokens),
                   "--row-len", str(a.row_len), "--prompt-len", str(a.prompt_len), "--chunk", str(a.chunk),
                   "--threads", str(a.threads)]
            res[v] = run_json(cmd, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(a.threads)}, timeout=3600)
            log(f"bench_memory: {v}: {res[v]}")
            out[f"{v}_peak_mb"] = res[v]["peak_mb"]
            out[f"{v}_seconds"] = res[v]["seconds"]
    out["device"] = next(iter(res.values()))["device"]
    if "full" in res and "chunked" in res:
        out["full_over_chunked"] = round(res["full"]["peak_mb"] / res["chunked"]["peak_mb"], 2)
        out["logp_sum_abs_diff"] = abs(res["full"]["logp_sum"] - res["chunked"]["logp_sum"])
        out["lm_head_grad_norm_rel_diff"] = abs(res["full"]["lm_head_grad_norm"] - res["chunked"]["lm_head_grad_norm"]) \
            / res["full"]["lm_head_grad_norm"]
    if "full" in res and "chunked_checkpointed" in res:
        out["full_over_chunked_checkpointed"] = round(res["full"]["peak_mb"] / res["chunked_checkpointed"]["peak_mb"], 2)
    out["memory_unit"] = "MiB"
    emit(out)


if __name__ == "__main__":
    main()
