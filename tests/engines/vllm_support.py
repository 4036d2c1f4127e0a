"""Helpers for the vllm and remote engine tests: a tiny Llama on disk, a transformers reference,
and a real vLLM OpenAI-compatible server in its own process group.

Imports only what both virtualenvs have (torch, transformers, tokenizers, httpx); vllm itself is
never imported here.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from opd_tasks.logprobs import gather_response, token_logp

PAD, BOS, EOS = 0, 1, 2
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789+-=*/ .,:;?!ABCDEFGHIJKLMNOPQRSTUVWXYZ"
VOCAB = 3 + len(CHARS)  # 77
MAX_LEN = 256


def save_tiny_llama(out: Path, seed: int = 0, eos_boost: float = 2.0) -> Path:
    """A random LlamaForCausalLM (hidden 128, 4 heads -> head_dim 32, 2 layers, vocab 77) plus a
    char-level PreTrainedTokenizerFast (pad/bos/eos = 0/1/2), saved as safetensors in `out`.

    Weights are drawn with a larger std than HF's init so next-token distributions are peaked but
    not one-hot; the EOS row of lm_head is scaled by `eos_boost` so some samples stop early."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, **{c: 3 + i for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", padding_side="left")
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LEN,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
        model.lm_head.weight[EOS] *= eos_boost
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    return out


def hf_response_logp(model_dir: Path, prompts, responses, temperature: float = 1.0) -> list[np.ndarray]:
    """Reference: a float32 transformers forward per row, through opd_tasks.logprobs (float64 out)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            ids = torch.tensor([list(p) + list(r)])
            per_tok = token_logp(model(ids).logits, ids, temperature=temperature)
            vals, _ = gather_response(per_tok, torch.tensor([len(p)]), torch.tensor([len(r)]))
            out.append(vals[0, :len(r)].double().numpy())
    return out


def hf_response_topk(model_dir: Path, prompts, responses, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Reference top-k per response position: float32 transformers forward per row, float64
    log-softmax, stable descending sort -> (ids [R, k], log-probs [R, k]) per row."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            lsm = model(torch.tensor([list(p) + list(r)])).logits[0].double().log_softmax(-1)
            top = torch.sort(lsm[len(p) - 1: len(p) - 1 + len(r)], dim=-1, descending=True, stable=True)
            out.append((top.indices[:, :k].numpy(), top.values[:, :k].numpy()))
    return out


def assert_topk_close(got, ref, tol: float) -> None:
    """TopKScores rows vs hf_response_topk: values within tol, ids equal wherever the reference's
    neighbouring values are more than tol apart (closer ones may swap under other kernels)."""
    for g, (ids, vals) in zip(got, ref):
        assert g.ids.shape == ids.shape and g.ids.dtype == np.int32 and g.topk_logp.dtype == np.float32
        assert (np.diff(g.topk_logp, axis=1) <= 0).all()
        np.testing.assert_allclose(g.topk_logp, vals, rtol=0, atol=tol)
        gap = np.abs(np.diff(vals, axis=1)) > tol
        clear = np.concatenate([gap[:, :1], gap[:, 1:] & gap[:, :-1], gap[:, -1:]], axis=1) if ids.shape[1] > 1 \
            else np.ones_like(ids, bool)
        np.testing.assert_array_equal(g.ids[clear], ids[clear])


def max_abs_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max((float(np.max(np.abs(np.asarray(x, np.float64) - y))) for x, y in zip(a, b) if len(x)),
               default=0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`python -m vllm.entrypoints.launchers.api_server.entry` on 127.0.0.1, own process group.

    Flags/env for a fast CPU start (~20 s): fp32, eager, 64 MiB KV cache, in-process engine,
    dynamo off, processed log-probs. stop() kills the whole group (killing only the main process
    leaves its engine child running). dev_mode adds the endpoints that reload weights."""

    def __init__(self, model_dir: Path, log_path: Path, dev_mode: bool = False, python: str = sys.executable,
                 max_len: int = MAX_LEN, cpus: str | None = None):
        """max_len: --max-model-len (at most the model's max_position_embeddings); cpus: `taskset -c
        CPUS` (benchmarks/bench_pipeline.py pins the server to its own core)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", TORCHDYNAMO_DISABLE="1")
        if dev_mode:  # /collective_rpc and /reset_prefix_cache, for RemoteEngine.load_weights
            env["VLLM_SERVER_DEV_MODE"] = "1"
        cmd = [python, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
               "--kv-cache-memory-bytes", "64M", "--max-model-len", str(max_len),
               "--logprobs-mode", "processed_logprobs", "--seed", "0"]
        cmd = ["taskset", "-c", cpus, *cmd] if cpus else cmd
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_healthy(self, timeout: float = 180.0) -> float:
        """Seconds until GET /health answers 200; fails with the server log's tail otherwise."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                pytest.fail(f"vllm server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"vllm server not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        finally:
            try:  # the group may outlive its leader
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._log.close()
