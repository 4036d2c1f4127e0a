"""The remote engine: unit tests on an httpx mock transport (main venv), and for real against a
`vllm` OpenAI-compatible server started here on 127.0.0.1 (marked vllm, runs in .venv-vllm):

    .venv/bin/python -m pytest -q -m "not vllm" tests/engines/test_remote.py
    .venv-vllm/bin/python -m pytest -q -m vllm -p no:cacheprovider -s tests/engines/test_remote.py
"""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
import numpy as np
import pytest

from opd_tasks.engines import EngineInputError
from opd_tasks.engines.base import SamplingParams
from opd_tasks.engines.remote import RemoteEngineError, RemoteGenerator, RemoteScorer, run_sync
from vllm_support import (EOS, VLLMServer, assert_topk_close, hf_response_logp, hf_response_topk, max_abs_diff,
                          save_tiny_llama)

TOL = 1e-3
MODELS = {"object": "list", "data": [{"id": "toy"}]}


def _fake_logp(p: list[int], i: int) -> float:
    return -(p[i] % 7) - 0.25 * i  # a made-up log-prob of the token at position i


class FakeServer:
    """Enough of vLLM's /v1/completions for the client logic: answers after a random delay,
    counts requests in flight, and can fail the first `fail_first` requests."""

    def __init__(self, fail_first: int = 0, status: int = 503, top1: int = 3):
        self.in_flight = self.max_in_flight = self.calls = 0
        self.fail_first, self.status, self.top1 = fail_first, status, top1
        self.bodies: list[dict] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        self.calls += 1
        if self.calls <= self.fail_first:
            if self.status == 0:
                raise httpx.ConnectError("refused", request=request)
            return httpx.Response(self.status, text="busy")
        body = json.loads(request.content)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(random.uniform(0.001, 0.02))
        self.in_flight -= 1
        p = body["prompt"]
        if "prompt_logprobs" in body:
            # The top-1 token comes first in each entry, the actual token second (as vLLM's
            # server does when it is not top-1): reading the first entry would be wrong. A list of
            # prompts gets one choice each (returned here in reverse: the client sorts by index).
            many = p if p and isinstance(p[0], list) else [p]
            plps = [[None] + [{str(self.top1): {"logprob": -0.01}, str(q[i]): {"logprob": _fake_logp(q, i)}}
                              for i in range(1, len(q))] for q in many]
            return httpx.Response(200, json={"choices": [{"index": i, "prompt_logprobs": plp}
                                                         for i, plp in enumerate(plps)][::-1]})
        choices = [{"index": g, "token_ids": [p[-1], g + 3], "finish_reason": "length",
                    "logprobs": {"token_logprobs": [-1.0, -float(g)]}} for g in range(body["n"])][::-1]
        return httpx.Response(200, json={"choices": choices})


def _scorer(fake, **kw) -> RemoteScorer:
    return RemoteScorer("http://test:8000/v1/", transport=httpx.MockTransport(fake), backoff=0.001, **kw)


def test_score_many_in_flight_in_order_by_token_id():
    fake = FakeServer()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 70) for _ in range(rng.randrange(1, 6))] for _ in range(40)]
    responses = [[rng.randrange(3, 70) for _ in range(rng.randrange(0, 5))] for _ in range(40)]
    got = _scorer(fake, max_concurrency=8).score(prompts, responses)
    for p, r, g in zip(prompts, responses, got):
        full = p + r
        assert g.dtype == np.float32 and len(g) == len(r)
        np.testing.assert_allclose(g, [_fake_logp(full, len(p) + j) for j in range(len(r))])
    assert 1 < fake.max_in_flight <= 8
    assert fake.calls == sum(1 for r in responses if r)  # empty responses cost no request
    assert all(b["model"] == "toy" and b["prompt_logprobs"] == 0 and b["max_tokens"] == 1 for b in fake.bodies)


def test_rows_per_request_sends_lists_of_prompts_and_gets_the_same_log_probs():
    rng = random.Random(1)
    prompts = [[rng.randrange(3, 70) for _ in range(rng.randrange(1, 6))] for _ in range(23)]
    responses = [[rng.randrange(3, 70) for _ in range(rng.randrange(0, 5))] for _ in range(23)]
    one, five = FakeServer(), FakeServer()
    want = _scorer(one).score(prompts, responses)
    got = _scorer(five, rows_per_request=5).score(prompts, responses)
    assert all(np.array_equal(g, w) for g, w in zip(got, want))
    rows = sum(1 for r in responses if r)
    assert one.calls == rows and five.calls == -(-rows // 5)
    assert all(isinstance(b["prompt"][0], list) and len(b["prompt"]) <= 5 for b in five.bodies)
    with pytest.raises(EngineInputError, match="rows_per_request"):
        _scorer(one, rows_per_request=0)


def test_generate_orders_choices_and_seeds_per_prompt():
    fake = FakeServer()
    gen = RemoteGenerator("http://test:8000", model="m", transport=httpx.MockTransport(fake))
    out = gen.generate([[5, 6], [7]], n=3, sampling=SamplingParams(temperature=0.7, seed=10, max_new_tokens=4))
    assert [[s.response_ids for s in g] for g in out] == [[[6, 3], [6, 4], [6, 5]], [[7, 3], [7, 4], [7, 5]]]
    np.testing.assert_array_equal(out[0][2].behaviour_logp, np.float32([-1.0, -2.0]))
    by_prompt = {tuple(b["prompt"]): b for b in fake.bodies}
    assert by_prompt[(5, 6)]["seed"] == 10 and by_prompt[(7,)]["seed"] == 11
    body = by_prompt[(7,)]
    assert body["model"] == "m" and body["logprobs"] == 0 and body["return_token_ids"] is True
    assert body["temperature"] == 0.7 and body["top_k"] == -1 and body["repetition_penalty"] == 1.0


@pytest.mark.parametrize("status", [503, 429, 0])  # 0: connection refused
def test_transient_failures_are_retried(status):
    fake = FakeServer(fail_first=2, status=status)
    assert len(_scorer(fake, retries=2).score([[1, 2]], [[3, 4]])[0]) == 2
    with pytest.raises(RemoteEngineError, match=r"http://test:8000: gave up after 2 attempts"):
        _scorer(FakeServer(fail_first=2, status=status), retries=1).score([[1, 2]], [[3, 4]])


def test_client_errors_fail_at_once_with_the_servers_message():
    fake = FakeServer(fail_first=5, status=400)
    with pytest.raises(RemoteEngineError, match="HTTP 400.*busy"):
        _scorer(fake, retries=3).score([[1, 2]], [[3]])
    assert fake.calls == 1


def test_bad_input_and_answers_are_named():
    with pytest.raises(EngineInputError, match="http://"):
        RemoteScorer("teacher:8000")
    with pytest.raises(EngineInputError, match="row 1 has an empty prompt"):
        _scorer(FakeServer()).score([[1], []], [[2], [3]])

    async def two_models(request):
        return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "b"}]})
    with pytest.raises(RemoteEngineError, match=r"serves models \['a', 'b'\]"):
        _scorer(two_models).score([[1]], [[2]])

    async def no_prompt_logprobs(request):  # e.g. a server without vLLM's extension
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return httpx.Response(200, json={"choices": [{"index": 0, "text": "x"}]})
    with pytest.raises(RemoteEngineError, match="prompt_logprobs"):
        _scorer(no_prompt_logprobs).score([[1]], [[2]])


def test_score_topk_sorts_by_logprob_then_id_and_needs_k_entries():
    async def topk_server(request):  # entries in scrambled order, a tie between ids 9 and 4
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        body = json.loads(request.content)
        k, p = body["prompt_logprobs"], body["prompt"]
        entry = {"9": {"logprob": -1.0}, "5": {"logprob": -3.0}, "4": {"logprob": -1.0}, "7": {"logprob": -0.5}}
        plp = [None] + [{**dict(list(entry.items())[:k + 1]), str(p[i]): {"logprob": -2.0}} for i in range(1, len(p))]
        return httpx.Response(200, json={"choices": [{"index": 0, "prompt_logprobs": plp}]})
    out = _scorer(topk_server).score_topk([[1, 2]], [[3, 6]], 3)[0]
    assert out.ids.tolist() == [[7, 4, 9], [7, 4, 9]] and out.ids.dtype == np.int32
    np.testing.assert_array_equal(out.topk_logp, np.float32([[-0.5, -1, -1], [-0.5, -1, -1]]))
    np.testing.assert_array_equal(out.logp, np.float32([-2, -2]))
    with pytest.raises(RemoteEngineError, match="fewer than scoring.top_k=9.*--max-logprobs 9"):
        _scorer(topk_server).score_topk([[1, 2]], [[3]], 9)


def test_factory_form_takes_the_model_path_as_a_hint():
    from opd_tasks.engines import make_scorer

    async def two_models(request):
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "a"}, {"id": "models/math"}]})
        return await FakeServer()(request)
    scorer = make_scorer("remote", "models/math", url="http://test:1/", max_concurrency=4, dtype="float32",
                         token_budget=10, vllm={}, trust_remote_code=False, transport=httpx.MockTransport(two_models))
    assert isinstance(scorer, RemoteScorer) and scorer.base_url == "http://test:1"
    assert len(scorer.score([[1]], [[2]])[0]) == 1 and scorer.model == "models/math"


def test_clients_share_one_ssl_context(monkeypatch):
    """A client per scored part used to load the CA bundle each time (~30 ms of CPU per part per teacher,
    most of the scoring client's CPU while streaming); the verifying context is built once per process."""
    import ssl

    from opd_tasks.engines import remote
    loads = []
    real = ssl.SSLContext.load_verify_locations
    monkeypatch.setattr(ssl.SSLContext, "load_verify_locations",
                        lambda self, *a, **k: loads.append(1) or real(self, *a, **k))
    remote.ssl_context.cache_clear()
    engine = RemoteScorer("https://teacher.example:8000")
    for _ in range(3):
        client = engine._client()
        assert client._transport._pool._ssl_context is remote.ssl_context()
        asyncio.run(client.aclose())
    assert len(loads) == 1


def test_sync_wrappers_work_inside_a_running_event_loop():
    async def main():
        return _scorer(FakeServer()).score([[4, 5]], [[6]])  # sync call from async code
    assert len(asyncio.run(main())[0]) == 1
    assert run_sync(lambda: asyncio.sleep(0, result=7)) == 7


# ---- for real: a vLLM server on 127.0.0.1 ------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    a, b = save_tiny_llama(root / "a", seed=0), save_tiny_llama(root / "b", seed=1)
    server = VLLMServer(a, root / "server.log", dev_mode=True)
    try:
        print(json.dumps({"vllm_server_health_s": round(server.wait_healthy(), 1)}))
        yield server, a, b
    finally:
        server.stop()


def _rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[1] + [rng.randrange(3, 77) for _ in range(rng.randrange(1, 20))] for _ in range(n)]
    responses = [[rng.randrange(2, 77) for _ in range(rng.randrange(1, 24))] for _ in range(n)]
    return prompts, responses


@pytest.mark.vllm
def test_remote_score_matches_transformers(served):
    server, a, _ = served
    prompts, responses = _rows(32)
    RemoteScorer(server.url).score(prompts[:2], responses[:2])  # warm up
    t0 = time.perf_counter()
    got = RemoteScorer(server.url, max_concurrency=32).score(prompts, responses)
    concurrent = time.perf_counter() - t0
    t0 = time.perf_counter()
    one_by_one = RemoteScorer(server.url, max_concurrency=1).score(prompts, responses)
    sequential = time.perf_counter() - t0
    batched = RemoteScorer(server.url, rows_per_request=8).score(prompts, responses)  # lists of 8 prompts
    ref = hf_response_logp(a, prompts, responses)
    diff = max(max_abs_diff(got, ref), max_abs_diff(one_by_one, ref), max_abs_diff(batched, ref))
    assert all(len(x) == len(y) for x, y in zip(batched, got))
    print(json.dumps({"remote_score_rows": 32, "concurrent_32_s": round(concurrent, 3),
                      "sequential_s": round(sequential, 3), "max_abs_diff_vs_transformers": diff}))
    assert diff < TOL


@pytest.mark.vllm
def test_remote_score_topk_matches_transformers(served):
    server, a, _ = served
    prompts, responses = _rows(6, seed=1)
    got = RemoteScorer(server.url).score_topk(prompts, responses, 5)
    assert max_abs_diff([g.logp for g in got], hf_response_logp(a, prompts, responses)) < TOL
    assert_topk_close(got, hf_response_topk(a, prompts, responses, 5), TOL)


@pytest.mark.vllm
def test_remote_generate_matches_transformers_at_temperature(served):
    server, a, _ = served
    gen = RemoteGenerator(server.url, max_concurrency=16)
    sp = SamplingParams(temperature=0.7, max_new_tokens=12, seed=4)
    prompts = _rows(6)[0]
    groups = gen.generate(prompts, n=3, sampling=sp)
    again = gen.generate(prompts, n=3, sampling=sp)
    assert [[s.response_ids for s in g] for g in groups] == [[s.response_ids for s in g] for g in again]
    flat = [(p, s) for p, g in zip(prompts, groups) for s in g]
    for _, s in flat:
        assert len(s.behaviour_logp) == len(s.response_ids) > 0
        if s.finish_reason == "stop":
            assert s.response_ids[-1] == EOS
        else:
            assert len(s.response_ids) == sp.max_new_tokens
    assert len({s.finish_reason for _, s in flat}) == 2
    p, r, b = [x[0] for x in flat], [x[1].response_ids for x in flat], [x[1].behaviour_logp for x in flat]
    diff = max_abs_diff(b, hf_response_logp(a, p, r, temperature=0.7))
    print(json.dumps({"remote_behaviour_logp_max_abs_diff_T0.7": diff}))
    assert diff < TOL
    assert max_abs_diff(b, hf_response_logp(a, p, r, temperature=1.0)) > 0.05


@pytest.mark.vllm
def test_remote_load_weights_in_place(served):
    server, a, b = served
    prompts, responses = _rows(8, seed=1)
    scorer = RemoteScorer(server.url)
    try:
        scorer.load_weights(str(b))
        assert max_abs_diff(scorer.score(prompts, responses), hf_response_logp(b, prompts, responses)) < TOL
    finally:
        scorer.load_weights(str(a))
    assert max_abs_diff(scorer.score(prompts, responses), hf_response_logp(a, prompts, responses)) < TOL
