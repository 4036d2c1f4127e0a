"""Teacher combination (docs/algorithms.md, "Several teachers") against float64 hand computations."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_tasks.combine import CombinationError, combine, mixture, normalize_weights, product, route
from opd_tasks.errors import OpdError


def _logp(rng, n):
    """Random log-probs in float32 (what the scoring stage stores), a few very small."""
    x = np.log(rng.dirichlet(np.ones(8), size=n)[:, 0]).astype(np.float32)
    x[::7] = -60.0
    return x


@pytest.fixture
def flat():
    rng = np.random.default_rng(0)
    return {"a": _logp(rng, 40), "b": _logp(rng, 40), "c": _logp(rng, 40)}


def test_single_teacher_weight_one_is_exact(flat):
    one = {"a": flat["a"]}
    for mode in ("mixture", "product"):
        out = combine(mode, one, {"a": 1.0})
        assert out.dtype == np.float32 and np.array_equal(out, flat["a"])
        assert out is not flat["a"]
    assert np.array_equal(combine("route", one, domain_to_teacher={"m": "a"}, token_domain=["m"] * 40), flat["a"])


def test_mixture_weight_zero_teacher_drops_out_exactly(flat):
    out = mixture(flat, {"a": 0.3, "b": 0.0, "c": 0.0})
    assert np.array_equal(out, flat["a"])


def test_mixture_matches_float64_reference(flat):
    w = {"a": 0.5, "b": 2.0, "c": 1.5}
    out = mixture(flat, w)
    total = sum(w.values())
    for t in range(40):
        ref = math.log(sum(w[k] / total * math.exp(float(flat[k][t])) for k in w))
        assert out[t] == pytest.approx(ref, abs=2e-6)


def test_mixture_weights_are_normalized(flat):
    a = mixture(flat, {"a": 1.0, "b": 3.0, "c": 0.0})
    b = mixture(flat, {"a": 0.25, "b": 0.75, "c": 0.0})
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    nw = normalize_weights({"a": 1.0, "b": 3.0})
    assert nw == {"a": 0.25, "b": 0.75}


def test_mixture_is_stable_far_out_and_keeps_minus_inf():
    t = {"a": np.array([-1000.0, -np.inf, -np.inf], np.float32),
         "b": np.array([-1000.0, -3.0, -np.inf], np.float32)}
    out = mixture(t, {"a": 1.0, "b": 1.0})
    assert out[0] == np.float32(-1000.0)
    assert out[1] == pytest.approx(-3.0 + math.log(0.5), abs=1e-6)
    assert out[2] == -np.inf


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 0), st.floats(-50, 0)), min_size=1, max_size=20),
       st.floats(0.01, 10), st.floats(0.01, 10))
def test_mixture_lies_between_its_teachers(pairs, wa, wb):
    a = np.array([p[0] for p in pairs], np.float32)
    b = np.array([p[1] for p in pairs], np.float32)
    out = mixture({"a": a, "b": b}, {"a": wa, "b": wb})
    assert np.all(out >= np.minimum(a, b) - 1e-5) and np.all(out <= np.maximum(a, b) + 1e-5)


def test_product_uses_weights_as_given(flat):
    w = {"a": 0.5, "b": 2.0, "c": 0.0}
    out = product(flat, w)
    ref = 0.5 * flat["a"].astype(np.float64) + 2.0 * flat["b"].astype(np.float64)
    np.testing.assert_allclose(out, ref.astype(np.float32), rtol=1e-7, atol=0)
    np.testing.assert_allclose(product({"a": flat["a"]}, {"a": 2.0}), 2.0 * flat["a"], rtol=1e-7)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "heavy"])
@pytest.mark.parametrize("mode", ["mixture", "product"])
def test_bad_weight_is_rejected_naming_the_teacher(flat, bad, mode):
    with pytest.raises(CombinationError, match="teacher 'b'") as err:
        combine(mode, flat, {"a": 1.0, "b": bad, "c": 1.0})
    assert isinstance(err.value, OpdError)


@pytest.mark.parametrize("mode", ["mixture", "product"])
def test_all_zero_and_missing_weights_are_rejected(flat, mode):
    with pytest.raises(CombinationError, match="all zero"):
        combine(mode, flat, {"a": 0.0, "b": 0.0, "c": 0.0})
    with pytest.raises(CombinationError, match=r"no weight for \['c'\]"):
        combine(mode, flat, {"a": 1.0, "b": 1.0})
    with pytest.raises(CombinationError, match="empty"):
        normalize_weights({})


def test_bad_teacher_arrays_are_rejected_naming_the_teacher(flat):
    short = dict(flat, b=flat["b"][:-1])
    with pytest.raises(CombinationError, match="teacher 'b': 39 token log-probs"):
        mixture(short, {"a": 1, "b": 1, "c": 1})
    nan = dict(flat, c=flat["c"].copy())
    nan["c"][5] = np.nan
    with pytest.raises(CombinationError, match="teacher 'c': token 5"):
        mixture(nan, {"a": 1, "b": 1, "c": 1})
    logits = dict(flat, a=flat["a"] + 10)
    with pytest.raises(CombinationError, match="teacher 'a'.*not a log-prob"):
        product(logits, {"a": 1, "b": 1, "c": 1})


def test_route_by_sample_domain_takes_exactly_that_teacher(flat):
    domains = ["math", "code", "math", "text", "code"]
    offsets = [0, 3, 11, 11, 30, 40]  # sample 2 has an empty response
    d2t = {"math": "a", "code": "b", "text": "c"}
    out = route(flat, d2t, sample_domain=domains, offsets=offsets)
    assert out.dtype == np.float32
    for s, d in enumerate(domains):
        lo, hi = offsets[s], offsets[s + 1]
        assert np.array_equal(out[lo:hi], flat[d2t[d]][lo:hi])
    token_domain = np.repeat(np.array(domains, dtype=object), np.diff(offsets))
    assert np.array_equal(combine("route", flat, domain_to_teacher=d2t, token_domain=token_domain), out)


def test_route_errors_name_the_domain(flat):
    d2t = {"math": "a", "code": "b"}
    with pytest.raises(CombinationError, match="sample 1 has domain 'poetry'"):
        route(flat, d2t, sample_domain=["math", "poetry"], offsets=[0, 20, 40])
    with pytest.raises(CombinationError, match="sample 0 has no domain"):
        route(flat, d2t, sample_domain=[None, "math"], offsets=[0, 20, 40])
    with pytest.raises(CombinationError, match="offsets"):
        route(flat, d2t, sample_domain=["math", "code"], offsets=[0, 20, 39])
    with pytest.raises(CombinationError, match=r"teachers \['z'\]"):
        route(flat, {"math": "z"}, sample_domain=["math"], offsets=[0, 40])
    with pytest.raises(CombinationError, match="exactly one"):
        route(flat, d2t)


def test_unknown_mode_is_rejected(flat):
    with pytest.raises(CombinationError, match="'average' is not one of"):
        combine("average", flat, {"a": 1, "b": 1, "c": 1})
