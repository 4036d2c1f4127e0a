"""Scoring throughput of the hf engine: HFScorer vs one forward per sample vs fixed-size padded
batches in arrival order, on a random Llama built from config (no download). Prints one JSON object.

    .venv/bin/python benchmarks/bench_scoring.py                      # ~17M params, 1 thread
    .venv/bin/python benchmarks/bench_scoring.py --hidden 128 --layers 2 --vocab 2048 --samples 128

matmul_fraction = useful model FLOP/s of HFScorer / FLOP/s of a large float32 matmul on the same
threads. Useful FLOPs: 2 x (layer params) per real token, attention 4 x hidden x causal context,
and the vocab head on response positions only (what scoring needs).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import numpy as np
import torch


def build(path: str, hidden: int, layers: int, heads: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=hidden * 8 // 3, num_hidden_layers=layers, max_position_embeddings=1024,
                      eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)


def per_sample(model, prompts, responses) -> list[np.ndarray]:
    from opd_tasks.logprobs import token_logp

    out = []
    for p, r in zip(prompts, responses):
        ids = torch.tensor([p + r])
        out.append(token_logp(model(input_ids=ids).logits, ids)[0, len(p):].numpy())
    return out


def padded_arrival(model, prompts, responses, batch: int) -> list[np.ndarray]:
    """The common baseline: fixed-size batches in arrival order, right padding + attention mask,
    full [B, L, V] logits."""
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


def timed(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def matmul_flops(n: int = 1024, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    dt, _ = timed(lambda: a @ b, repeat)
    return 2 * n**3 / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--max-response", type=int, default=128)
    ap.add_argument("--padded-batch", type=int, default=32, help="rows per batch of the arrival-order baseline")
    ap.add_argument("--token-budget", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--skip-per-sample", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from opd_tasks.engines.hf import HFScorer

    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, args.vocab, rng.integers(4, args.max_prompt + 1)).tolist() for _ in range(args.samples)]
    responses = [rng.integers(3, args.vocab, rng.integers(1, args.max_response + 1)).tolist()
                 for _ in range(args.samples)]
    tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
    with tempfile.TemporaryDirectory() as d:
        build(d, args.hidden, args.layers, args.heads, args.vocab)
        scorer = HFScorer(d, token_budget=args.token_budget, progress=False)
    model = scorer.model
    with torch.inference_mode():
        scorer.score(prompts[:8], responses[:8])  # warm-up
        t_hf, ours = timed(lambda: scorer.score(prompts, responses), args.repeat)
        t_pad, pad = timed(lambda: padded_arrival(model, prompts, responses, args.padded_batch), args.repeat)
        t_one, one = (None, None) if args.skip_per_sample else timed(
            lambda: per_sample(model, prompts, responses), 1)
    err = max(float(np.abs(a - b).max()) for a, b in zip(ours, pad))
    if one is not None:
        err = max(err, max(float(np.abs(a - b).max()) for a, b in zip(ours, one)))

    cfg = model.config
    n_layer_params = sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)
    resp_tokens = sum(len(r) for r in responses)
    attn = sum(4 * cfg.hidden_size * cfg.num_hidden_layers * (n * (n + 1) / 2)
               for n in (len(p) + len(r) for p, r in zip(prompts, responses)))
    useful = 2 * n_layer_params * tokens + attn + 2 * cfg.hidden_size * cfg.vocab_size * resp_tokens
    peak = matmul_flops()
    print(json.dumps({
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "samples": args.samples, "tokens": tokens, "response_tokens": resp_tokens, "threads": args.threads,
        "hf_tok_s": round(tokens / t_hf), "padded_tok_s": round(tokens / t_pad),
        "per_sample_tok_s": None if t_one is None else round(tokens / t_one),
        "speedup_vs_per_sample": None if t_one is None else round(t_one / t_hf, 2),
        "speedup_vs_padded": round(t_pad / t_hf, 2),
        "hf_gflop_s": round(useful / t_hf / 1e9, 2), "matmul_gflop_s": round(peak / 1e9, 2),
        "matmul_fraction": round(useful / t_hf / peak, 3),
        "hf_batches": scorer.last_stats.get("batches"), "token_budget": args.token_budget,
        "cpu_forward_tokens": scorer.cpu_forward_tokens, "max_abs_diff": err,
    }))


if __name__ == "__main__":
    main()
