"""Shared pieces of the benchmark scripts (not part of opd, never imported by it or its tests).

Models are built from a config (no hub); lengths come from a long-tailed distribution; variants
are timed interleaved, best of N, on a fixed number of torch threads; each script prints ONE JSON
object on stdout (logs go to stderr).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def quiet_env() -> None:
    """Offline, no progress bars, no analytics: set before transformers/prefect are imported."""
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TRANSFORMERS_VERBOSITY": "error",
                       "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(obj: dict) -> None:
    """The script's one JSON object, on stdout."""
    print(json.dumps(obj), flush=True)


def long_tailed(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> list[int]:
    """n lengths ~ round(LogNormal(log(median), sigma)) clipped to [lo, hi]: most short, a few long."""
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int).tolist()


def llama_config(vocab: int, hidden: int, layers: int, heads: int, max_len: int = 1024, **extra):
    """A Llama config (head_dim = hidden/heads must be >= 32 for vLLM's CPU attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=heads,
                       intermediate_size=hidden * 8 // 3, num_hidden_layers=layers, max_position_embeddings=max_len,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, **extra)


def save_llama(path: str | Path, cfg, seed: int = 0) -> Path:
    """A random LlamaForCausalLM from `cfg`, saved as safetensors."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return Path(path)


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def matmul_flops(threads: int, dtype: str = "float32", sizes=(512, 1024, 2048), repeat: int = 5) -> float:
    """This machine's matmul FLOP/s in `dtype` on `threads` torch threads: best over sizes x repeats."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=getattr(torch, dtype)), torch.randn(n, n, dtype=getattr(torch, dtype))
        a @ b
        for _ in range(repeat):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def machine() -> dict:
    """What the numbers were measured on (the load average says how busy the shared machine was)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def versions(*names: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            out[n] = None
    return out


def run_json(cmd: list[str], env: dict | None = None, timeout: float = 900) -> dict:
    """Run a helper process whose last stdout line is a JSON object; its stderr passes through."""
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def find_python(venv: str, module: str) -> str | None:
    """This interpreter if it can import `module`, else ROOT/venv/bin/python if that exists."""
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        return sys.executable
    exe = ROOT / venv / "bin" / "python"
    return str(exe) if exe.exists() else None
