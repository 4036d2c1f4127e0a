"""GPU smoke check (scripts/gpu_smoke.sh): the hf engine's rollout and scoring and the trainer (bf16,
NCCL at world size 1) on a random ~0.5B-parameter Qwen3 built from config; prints one JSON object.

    python scripts/gpu_smoke.py                    # cuda: ~0.5B model, 64 prompts x 4 samples x 128 tokens
    python scripts/gpu_smoke.py --device cpu       # dry mode: a tiny model, seconds (what CI runs)

JSON: per stage (rollout, scoring, train) tokens, seconds, tokens_per_s, peak_gpu_gib (torch's peak
allocated memory, reset before each stage; null on cpu); bf16_vs_fp32 (max / mean absolute difference
between the bf16 scorer's log-probs and a float32 forward of the same rows). No Prefect: the stage
functions of opd_tasks are called directly (run_rollout, run_scoring, the in-process trainer, which on
cuda is an NCCL group of one rank).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIZES = {  # cuda: ~0.5B (Qwen3-0.6B's widths, 22 layers); cpu: seconds
    "cuda": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=22,
                 num_attention_heads=16, num_key_value_heads=8, head_dim=128),
    "cpu": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32),
}
WORK = {"cuda": dict(prompts=64, group=4, new=128, prompt_len=64), "cpu": dict(prompts=8, group=2, new=16, prompt_len=12)}


def build(root: Path, device: str) -> tuple[str, str, str, int]:
    """Random Qwen3 student and teacher (seeds 0, 1; safetensors) + a WordLevel tokenizer over the whole
    vocabulary; prompts Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    size, work = SIZES[device], WORK[device]
    vocab = {"<pad>": 0, "<eos>": 1, **{f"t{i}": i for i in range(2, size["vocab_size"])}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", padding_side="left")
    cfg = Qwen3Config(**size, max_position_embeddings=4096, tie_word_embeddings=True, eos_token_id=1,
                      pad_token_id=0, bos_token_id=None)
    dirs = []
    for seed, name in ((0, "student"), (1, "teacher")):
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(cfg)
        dirs.append(root / name)
        model.save_pretrained(dirs[-1], safe_serialization=True)
        fast.save_pretrained(dirs[-1])
        params = sum(p.numel() for p in model.parameters())
        del model
    import random
    rng = random.Random(0)
    rows = [{"prompt_id": f"p{i}", "prompt": " ".join(f"t{rng.randrange(2, size['vocab_size'])}"
                                                     for _ in range(work["prompt_len"])),
             "answer": None, "domain": "smoke"} for i in range(work["prompts"])]
    data = root / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("prompt_id", pa.string()), ("prompt", pa.string()),
                                                               ("answer", pa.string()), ("domain", pa.string())])), data)
    return str(dirs[0]), str(dirs[1]), str(data), params


def _reset(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak(device: str) -> float | None:
    import torch
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--work-dir", default=None)
    args = ap.parse_args()
    import numpy as np
    import torch

    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.hf import HFGenerator, HFScorer
    from opd_tasks.rollout import run_rollout
    from opd_tasks.scoring import run_scoring
    from opd_tasks.trainer.stage import run_training
    from storage.shards import read_stage

    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device; use --device cpu for the dry mode"}))
        return 2
    root = Path(args.work_dir or tempfile.mkdtemp(prefix="opd-gpu-smoke-"))
    t0 = time.perf_counter()
    model, teacher, data, params = build(root, dev)
    w = WORK[dev]
    bf16 = dev == "cuda"  # CPU dry mode stays float32 (bf16 matmuls on CPU are slow, not what is checked)
    dtype = "bfloat16" if bf16 else "float32"
    cfg = parse_config({
        "name": "gpu-smoke", "iterations": 1, "student": {"path": model, "dtype": dtype},
        "teachers": [{"name": "teacher", "path": teacher, "dtype": dtype}], "loss": {"kind": "rkl"},
        "rollout": {"engine": "hf", "prompts_per_iteration": w["prompts"], "group_size": w["group"],
                    "max_new_tokens": w["new"], "rows_per_part": w["prompts"] * w["group"]},
        "scoring": {"engine": "hf"},
        "train": {"device": dev, "mixed_precision": "bf16" if bf16 else "none", "nproc_per_node": 1,
                  "launcher": "inprocess", "mini_batches": 2, "micro_batch_tokens": 4096, "lr": 1e-5},
        "data": {"train": data}}, "gpu_smoke")
    ctx = prepare_run(cfg, str(root / "run"))
    out: dict = {"device": dev, "torch": torch.__version__, "params": params, "dtype": dtype,
                 "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
                 "build_seconds": round(time.perf_counter() - t0, 2)}

    _reset(dev)
    gen = HFGenerator(model, dtype=dtype, device=dev, token_budget=1 << 16)
    r = run_rollout(ctx, 0, generator=gen)
    out["rollout"] = {"tokens": r.tokens, "seconds": round(r.seconds, 3), "tokens_per_s": round(r.tokens_per_s, 1),
                      "peak_gpu_gib": _peak(dev)}
    del gen
    _reset(dev)
    scorer = HFScorer(teacher, dtype=dtype, device=dev, token_budget=1 << 16)
    s = run_scoring(ctx, 0, scorers={"teacher": scorer})
    out["scoring"] = {"tokens": s.tokens, "seconds": round(s.seconds, 3), "tokens_per_s": round(s.tokens_per_s, 1),
                      "peak_gpu_gib": _peak(dev)}
    del scorer
    table = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    ref = HFScorer(teacher, dtype="float32", device=dev, token_budget=1 << 15).score(prompts, responses)
    got = table.column("teacher_logp.teacher").to_pylist()
    diffs = np.concatenate([np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)) for a, b in zip(got, ref)])
    out["bf16_vs_fp32"] = {"scorer_dtype": dtype, "max_abs_diff": float(diffs.max()),
                           "mean_abs_diff": float(diffs.mean()), "tokens": int(diffs.size)}
    if dev == "cuda":
        torch.cuda.empty_cache()
    _reset(dev)
    t = run_training(ctx, 0)
    out["train"] = {"tokens": t.tokens, "seconds": round(t.seconds, 3),
                    "tokens_per_s": round(t.metrics.get("tokens_per_s", 0.0), 1), "peak_gpu_gib": _peak(dev),
                    "loss": t.metrics.get("loss"), "backend": "nccl" if dev == "cuda" else "gloo", "world_size": 1}
    out["total_seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(out, indent=2))
    if args.work_dir is None:
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
