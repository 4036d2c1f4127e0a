"""The in-process transformers engine: scoring alignment, padding, generation log-probs, weights."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_tasks.engines import EngineInputError, make_generator, make_scorer
from opd_tasks.engines.base import SamplingParams
from opd_tasks.engines.hf import HFGenerator, HFScorer, sampling_logp
from opd_tasks.packing import pack
from opd_tasks.errors import ModelPathError, OpdError

VOCAB = 50
EOS_IDS = [2, 40, 41]  # several stop tokens (like Llama 3), so that "stop" is common enough


def build_tiny_llama(path, seed=0, tie=False):
    """A random 2-layer Llama (hidden 64, 2 heads of 32) with a word-level tokenizer, saved as an HF
    dir; its generation config stops at any of EOS_IDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    toks = ["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_attention_heads=2, num_key_value_heads=2,
                      intermediate_size=128, num_hidden_layers=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, pad_token_id=3, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = EOS_IDS
    with torch.no_grad():  # larger logits than the default init: a peakier, more model-like distribution
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def scorer(tiny):
    return HFScorer(tiny, progress=False)


def reference_logp(model, prompt, response, temperature=1.0):
    """One unpadded forward, float64 log-softmax at each response position, by hand."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0].double() / temperature
    lsm = torch.log_softmax(logits, -1)
    return np.array([lsm[len(prompt) - 1 + j, t].item() for j, t in enumerate(response)])


ids = st.integers(0, VOCAB - 1)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.tuples(st.lists(ids, min_size=1, max_size=12), st.lists(ids, min_size=0, max_size=12)),
                min_size=1, max_size=6),
       st.sampled_from([16, 40, 4096]))
def test_score_equals_a_direct_forward_at_each_response_position(scorer, pairs, budget):
    scorer.token_budget = budget
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    out = scorer.score(prompts, responses)
    assert len(out) == len(pairs)
    for p, r, o in zip(prompts, responses, out):
        assert o.dtype == np.float32 and o.shape == (len(r),)
        np.testing.assert_allclose(o, reference_logp(scorer.model, p, r), rtol=0, atol=2e-5)


def test_batched_rows_of_different_lengths_equal_each_row_alone(scorer):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (1, 9, 3, 14, 5)]
    responses = [rng.integers(0, VOCAB, n).tolist() for n in (12, 1, 7, 2, 0)]
    scorer.token_budget = 4096
    together = scorer.score(prompts, responses)
    assert scorer.last_stats["batches"] == 1
    for p, r, t in zip(prompts, responses, together):
        alone = scorer.score([p], [r])[0]
        np.testing.assert_allclose(t, alone, rtol=0, atol=1e-5)
    assert together[1].shape == (1,) and together[4].shape == (0,)


def test_full_forward_fallback_gives_the_same_values(tiny):
    s = HFScorer(tiny, progress=False)
    prompts, responses = [[1, 5, 6], [1]], [[7, 8, 9, 2], [4]]
    fast = s.score(prompts, responses)
    s._plain_head = False  # what a model with softcapped/scaled logits takes
    for a, b in zip(fast, s.score(prompts, responses)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def test_pack_by_budget_sorts_and_respects_the_budget():
    lengths = [5, 17, 3, 9, 9, 40, 1, 12]
    batches = pack(range(len(lengths)), lengths, 36)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths, reverse=True)
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 36
    assert batches[0] == [5]  # 40 > budget: alone
    assert pack([], [], 10) == []


def test_sampling_logp_temperature_top_k_top_p_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    x = logits[0].double().tolist()

    def lse(vals):
        return math.log(sum(math.exp(v) for v in vals))

    t = 0.5
    out = sampling_logp(logits, temperature=t)[0]
    for i in range(5):
        assert out[i].item() == pytest.approx(x[i] / t - lse([v / t for v in x]), abs=1e-6)
    out = sampling_logp(logits, top_k=2)[0]  # keep 2.0 and 1.0
    assert out[2:].tolist() == [-math.inf] * 3
    assert out[0].item() == pytest.approx(2.0 - lse([2.0, 1.0]), abs=1e-6)
    # probs ~ [.53, .20, .12, .03, .07]: top_p=0.7 keeps the two most likely (mass .73 >= .7)
    out = sampling_logp(logits, top_p=0.7)[0]
    assert torch.isfinite(out).tolist() == [True, True, False, False, False]
    out = sampling_logp(logits, top_p=0.8)[0]  # needs the third (.73 < .8)
    assert torch.isfinite(out).tolist() == [True, True, True, False, False]
    assert out[2].item() == pytest.approx(0.5 - lse([2.0, 1.0, 0.5]), abs=1e-6)


@pytest.fixture(scope="module")
def generator(tiny):
    return HFGenerator(tiny, token_budget=120, progress=False)


PROMPTS = [[1, 5], [1, 7, 8, 9, 10, 11], [1], [1, 20, 21, 22]]


@pytest.mark.parametrize("compact_below", [0.75, 1.0, 0.0])  # default / on every stop / never
def test_behaviour_logp_equals_teacher_forced_recomputation(generator, compact_below, monkeypatch):
    monkeypatch.setattr(generator, "compact_below", compact_below)
    sp = SamplingParams(temperature=0.7, max_new_tokens=12, seed=11)
    result = generator.generate(PROMPTS, n=3, sampling=sp)
    assert [len(r) for r in result] == [3] * len(PROMPTS)
    reasons = set()
    for p, samples in zip(PROMPTS, result):
        for s in samples:
            assert 1 <= len(s.response_ids) <= 12 and s.behaviour_logp.shape == (len(s.response_ids),)
            assert s.behaviour_logp.dtype == np.float32
            np.testing.assert_allclose(s.behaviour_logp, reference_logp(generator.model, p, s.response_ids, 0.7),
                                       rtol=0, atol=1e-4)
            assert (s.finish_reason == "stop") == (s.response_ids[-1] in EOS_IDS)
            assert not set(EOS_IDS) & set(s.response_ids[:-1])
            assert s.finish_reason == "stop" or len(s.response_ids) == 12
            reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}  # both ends were exercised


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.0, 0.9), (0.0, 1.0)])
def test_shared_prefill_gives_the_same_samples_bitwise(generator, temperature, top_p, monkeypatch):
    """One prefill per prompt (its KV cache and last logits copied to its G rows) samples exactly
    what G prefills sample: same tokens, bitwise-equal log-probs (the copied rows hold the same
    numbers; a row's values do not depend on the other rows of the prefill batch here), also when
    a batch boundary splits a prompt's samples (token_budget 120 packs 6-8 rows)."""
    sp = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=12, seed=11)
    prefills = []
    real = generator.model.forward

    def counting(*a, **kw):
        if kw.get("past_key_values") is None:
            prefills.append(kw["input_ids"].shape[0])
        return real(*a, **kw)

    monkeypatch.setattr(generator.model, "forward", counting)
    monkeypatch.setattr(generator, "shared_prefill", False)
    unshared = generator.generate(PROMPTS, n=3, sampling=sp)
    rows_unshared, prefills[:] = sum(prefills), []
    monkeypatch.setattr(generator, "shared_prefill", True)
    shared = generator.generate(PROMPTS, n=3, sampling=sp)
    assert rows_unshared == 3 * len(PROMPTS) and len(PROMPTS) <= sum(prefills) < rows_unshared
    for sa, sb in zip(shared, unshared):
        for x, y in zip(sa, sb):
            assert x.response_ids == y.response_ids and x.finish_reason == y.finish_reason
            assert np.array_equal(x.behaviour_logp, y.behaviour_logp)


def test_top_k_samples_stay_in_the_top_k_and_are_renormalized(generator):
    sp = SamplingParams(temperature=1.0, top_k=3, max_new_tokens=6, seed=2)
    for p, samples in zip(PROMPTS, generator.generate(PROMPTS, n=2, sampling=sp)):
        for s in samples:
            ids = torch.tensor([p + s.response_ids])
            with torch.no_grad():
                logits = generator.model(ids).logits[0].double()
            for j, tok in enumerate(s.response_ids):
                row = logits[len(p) - 1 + j]
                top = row.topk(3).values
                assert row[tok] >= top[-1]
                expected = row[tok] - torch.logsumexp(top, 0)
                assert s.behaviour_logp[j] == pytest.approx(expected.item(), abs=1e-4)


def test_generation_is_deterministic_per_seed(generator):
    sp = SamplingParams(max_new_tokens=8, seed=5)
    a = generator.generate(PROMPTS, n=2, sampling=sp)
    b = generator.generate(PROMPTS, n=2, sampling=sp)
    c = generator.generate(PROMPTS, n=2, sampling=SamplingParams(max_new_tokens=8, seed=6))
    ids = lambda r: [s.response_ids for samples in r for s in samples]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert all(np.array_equal(x.behaviour_logp, y.behaviour_logp) for sa, sb in zip(a, b) for x, y in zip(sa, sb))


@pytest.mark.parametrize("tie", [False, True])
def test_load_weights_swaps_in_place(tmp_path, tie):
    a = build_tiny_llama(tmp_path / "a", seed=0, tie=tie)
    b = build_tiny_llama(tmp_path / "b", seed=1, tie=tie)
    scorer = make_scorer("hf", str(a), progress=False)
    model, weight = scorer.model, next(scorer.model.parameters())
    before = scorer.score([[1, 5]], [[6, 7]])[0]
    scorer.load_weights(str(b))
    after = scorer.score([[1, 5]], [[6, 7]])[0]
    assert scorer.model is model and next(scorer.model.parameters()).data_ptr() == weight.data_ptr()
    np.testing.assert_allclose(after, HFScorer(b, progress=False).score([[1, 5]], [[6, 7]])[0], rtol=0, atol=1e-6)
    assert not np.allclose(before, after)


def test_bad_inputs_are_named(scorer, generator, tmp_path):
    with pytest.raises(EngineInputError, match=r"prompt 1: token id 50 is outside the vocabulary \[0, 50\)"):
        scorer.score([[1], [1, 50]], [[2], [3]])
    with pytest.raises(EngineInputError, match="sample 0 has an empty prompt"):
        scorer.score([[]], [[4]])
    with pytest.raises(EngineInputError, match="2 prompts but 1 responses"):
        scorer.score([[1], [1]], [[2]])
    with pytest.raises(EngineInputError, match="max_position_embeddings=128"):
        generator.generate([[1] * 120], n=1, sampling=SamplingParams(max_new_tokens=16))
    with pytest.raises(EngineInputError, match="prompt 0 is empty"):
        generator.generate([[]], n=1, sampling=SamplingParams())
    with pytest.raises(ModelPathError, match="nowhere' does not exist"):
        HFScorer(tmp_path / "nowhere")
    with pytest.raises(ModelPathError, match="no \\*.safetensors"):
        scorer.load_weights(str(tmp_path))
    with pytest.raises(EngineInputError, match="'tgi' is not one of"):
        make_generator("tgi", "x")
    assert issubclass(EngineInputError, OpdError)


def test_progress_bar_reports_tokens(tiny, capsys):
    s = HFScorer(tiny, progress=True)
    s.score([[1, 2, 3]], [[4, 5]])
    assert s.last_stats["tokens"] == 5 and s.last_stats["tokens_per_s"] > 0


def test_factory_keeps_the_options_each_kind_uses():
    from opd_tasks.engines import _opts_for

    opts = dict(dtype="bfloat16", token_budget=99, vllm={"max_model_len": 64}, url=None, max_concurrency=8,
                trust_remote_code=True, extra=1)
    assert _opts_for("hf", opts) == dict(dtype="bfloat16", token_budget=99, trust_remote_code=True, extra=1)
    assert _opts_for("vllm", opts) == dict(dtype="bfloat16", max_model_len=64, trust_remote_code=True, extra=1)
    assert _opts_for("remote", opts) == dict(url=None, max_concurrency=8, extra=1)


def test_eos_falls_back_to_the_tokenizer(tmp_path):
    import json

    d = build_tiny_llama(tmp_path / "m")
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((d / name).read_text())
        cfg.pop("eos_token_id", None)
        (d / name).write_text(json.dumps(cfg))
    gen = HFGenerator(d, progress=False)
    assert gen.eos_ids == [2]  # the tokenizer's </s>
    result = gen.generate([[1, 5]], n=1, sampling=SamplingParams(max_new_tokens=4))
    assert gen.last_stats["sampling"]["top_k"] == -1 and len(result[0][0].response_ids) <= 4


# ---- top-k scoring (scoring.top_k) ----------------------------------------------------------------

def reference_topk(model, prompt, response, k):
    """One unpadded forward per row: float64 log-softmax, the k largest per response position (stable)."""
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        lsm = torch.log_softmax(model(ids).logits[0].double(), -1)[len(prompt) - 1: len(prompt) - 1 + len(response)]
    top = torch.sort(lsm, dim=-1, descending=True, stable=True)
    return top.indices[:, :k].numpy(), top.values[:, :k].numpy()


@pytest.mark.parametrize("k,budget,plain", [(8, 40, True), (VOCAB, 4096, True), (3, 4096, False)])
def test_score_topk_is_each_positions_top_k_of_a_direct_forward(tiny, k, budget, plain):
    s = HFScorer(tiny, progress=False, token_budget=budget)
    s._plain_head = plain
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, VOCAB, n).tolist() for n in (1, 9, 3, 14, 5)]
    responses = [rng.integers(0, VOCAB, n).tolist() for n in (12, 1, 7, 2, 0)]
    out, plain_scores = s.score_topk(prompts, responses, k), s.score(prompts, responses)
    for p, r, o, lp in zip(prompts, responses, out, plain_scores):
        assert o.ids.shape == o.topk_logp.shape == (len(r), k) and o.ids.dtype == np.int32
        np.testing.assert_array_equal(o.logp, lp)  # score() unchanged, bit for bit
        want_ids, want_lp = reference_topk(s.model, p, r, k)
        np.testing.assert_array_equal(o.ids, want_ids)
        np.testing.assert_allclose(o.topk_logp, want_lp, rtol=0, atol=2e-5)
        assert (np.diff(o.topk_logp, axis=1) <= 0).all()
        for j, t in enumerate(r):  # the actual token's value is the same float as in the top-k
            hit = np.flatnonzero(o.ids[j] == t)
            assert not hit.size or o.topk_logp[j, hit[0]] == o.logp[j]


@pytest.mark.parametrize("budget", [40, 4096])
def test_rows_of_one_prompt_run_it_once_with_the_same_log_probs(tiny, budget):
    """G samples of a prompt (HFScorer.shared_prefill): one KV-cached prefill per prompt, copied to its
    rows; the log-probs and top-k equal the float64 reference as the one-forward-per-row path does,
    and fewer tokens go through the model."""
    rng = np.random.default_rng(3)
    prompts, responses = [], []
    for n, lens in ((1, (5, 0, 1)), (9, (12, 3, 7)), (4, (2, 2, 2)), (6, (8,))):  # the last one unshared
        p = rng.integers(0, VOCAB, n).tolist()
        for r in lens:
            prompts.append(p)
            responses.append(rng.integers(0, VOCAB, r).tolist())
    order = rng.permutation(len(prompts))  # a prompt's rows need not be next to each other
    prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
    shared, alone = (HFScorer(tiny, progress=False, token_budget=budget) for _ in range(2))
    alone.shared_prefill = False
    got, want = shared.score_topk(prompts, responses, 5), alone.score_topk(prompts, responses, 5)
    assert shared.last_stats["forward_tokens"] < alone.last_stats["forward_tokens"]
    for p, r, g, w in zip(prompts, responses, got, want):
        assert g.logp.shape == (len(r),) and g.ids.shape == (len(r), 5)
        np.testing.assert_allclose(g.logp, reference_logp(shared.model, p, r), rtol=0, atol=2e-5)
        np.testing.assert_allclose(g.logp, w.logp, rtol=0, atol=1e-5)
        want_ids, want_lp = reference_topk(shared.model, p, r, 5)
        np.testing.assert_array_equal(g.ids, want_ids)
        np.testing.assert_allclose(g.topk_logp, want_lp, rtol=0, atol=2e-5)
    for a, b in zip(shared.score(prompts, responses), got):  # score() is score_topk's logp, bit for bit
        np.testing.assert_array_equal(a, b.logp)


def test_topk_ties_go_to_the_smaller_id_and_bad_k_is_named(scorer):
    from opd_tasks.logprobs import topk_logp
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 1.0, 2.0]])
    ids, lp = topk_logp(logits, 4)
    assert ids.tolist() == [[1, 3, 5, 2]] and lp[0, 0] == lp[0, 2]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # many ties, inside the k and at the k-th value: always a stable full sort's answer
        V = int(torch.randint(2, 40, (1,), generator=g))
        k = int(torch.randint(1, V + 1, (1,), generator=g))
        x = torch.randint(-3, 3, (5, V), generator=g).float()
        ref = torch.sort(x - torch.logsumexp(x, -1, keepdim=True), dim=-1, descending=True, stable=True)
        ids, lp = topk_logp(x, k)
        assert torch.equal(ids, ref.indices[:, :k]) and torch.equal(lp, ref.values[:, :k])
    with pytest.raises(EngineInputError, match="scoring.top_k"):
        scorer.score_topk([[1]], [[2]], VOCAB + 1)
    with pytest.raises(EngineInputError, match="scoring.top_k"):
        scorer.score_topk([[1]], [[2]], 0)
