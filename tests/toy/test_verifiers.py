import pytest

from opd_tasks.config import ConfigError
from opd_tasks.verifiers import (NoVerifierError, check_domains, exact, find_verifier, get_verifier, math_equal,
                                 normalize, register_verifier)


@pytest.mark.parametrize("domain", ["add", "rev", "exact", None])
def test_builtin_exact_verifiers(domain):
    v = get_verifier(domain)
    assert v is exact
    assert v("0521", "0521") == 1.0
    assert v("0522", "0521") == 0.0
    assert v(" 0521 \n", "0521") == 1.0          # whitespace
    assert v("0521<eos>", "0521") == 1.0           # eos left in by decode()
    assert v("0521<eos><pad><pad>", "0521") == 1.0
    assert v("0521</s>", " 0521") == 1.0
    assert v("", "0521") == 0.0
    assert v("05210", "0521") == 0.0               # trailing junk is wrong
    assert v("0521<eos>7", "0521") == 0.0          # text after eos is not stripped
    assert v("05<bos>21", "0521") == 0.0


@pytest.mark.parametrize("response, answer, ok", [
    ("so the answer is \\boxed{\\frac{1}{2}}.", "0.5", 1.0),       # equivalent forms
    ("\\boxed{0.5}<|im_end|>", "\\frac12", 1.0),
    ("First 2+2=4, then \\boxed{x(x+2)}", "x^2+2x", 1.0),            # algebraically equal
    ("\\boxed{\\dfrac{3}{4}}", "0.75", 1.0),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}", 1.0),                       # sets
    ("The answer is 42", "42", 1.0),                               # no \boxed: the expression
    ("\\boxed{8}", "7", 0.0),
    ("\\boxed{0.51}", "\\frac{1}{2}", 0.0),
    ("no idea", "7", 0.0),                                          # nothing to parse
    ("", "7", 0.0),
])
def test_math_verifier_accepts_equivalent_answers(response, answer, ok):
    assert get_verifier("math") is math_equal
    assert math_equal(response, answer) == ok


def test_math_verifier_runs_outside_the_main_thread():
    import threading
    out = []
    t = threading.Thread(target=lambda: out.append(math_equal("\\boxed{\\frac{2}{4}}", "0.5")))
    t.start(), t.join()
    assert out == [1.0]


def test_a_domain_without_verifier_is_a_config_error_not_exact_match():
    with pytest.raises(NoVerifierError, match=r"\['code'\] have no verifier.*data\.verifiers") as err:
        get_verifier("code")
    assert isinstance(err.value, ConfigError) and "\n" not in str(err.value)
    assert find_verifier("code") is None
    with pytest.raises(NoVerifierError, match=r"\['code', 'sql'\].*loss.kind=kdrl"):
        check_domains(["add", "code", "sql", None], {}, "loss.kind=kdrl")
    # data.verifiers maps a domain to a verifier; `none` says it has none (still an error where needed)
    assert get_verifier("code", {"code": "exact"}) is exact
    assert get_verifier("algebra", {"algebra": "math"}) is math_equal
    assert find_verifier("code", {"code": "none"}) is None
    with pytest.raises(NoVerifierError, match="code"):
        check_domains(["code"], {"code": "none"}, "evaluation")
    with pytest.raises(NoVerifierError, match=r"data\.verifiers: unknown verifier\(s\) \['code: maths'\]"):
        check_domains(["add"], {"code": "maths"}, "evaluation")


def test_register_verifier():
    register_verifier("test-numeric", lambda r, a: float(int(normalize(r)) == int(a)))
    try:
        assert get_verifier("test-numeric")("0521<eos>", "521") == 1.0
        assert get_verifier("test-numeric")("520", "521") == 0.0
    finally:
        from opd_tasks import verifiers
        verifiers._REGISTRY.pop("test-numeric")
    with pytest.raises(TypeError):
        register_verifier("x", "not callable")
    assert normalize(" ab <eos> ") == "ab"


def test_a_run_needing_rewards_of_an_unverified_domain_is_refused_before_it_starts(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opd_tasks.config import parse_config
    from opd_tasks.verifiers import check_run_verifiers
    data = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": ["1", "2", "3"], "domain": ["add", "code", "sql"]}),
                   data)
    base = {"student": {"path": "s"}, "teachers": [{"name": "t", "path": "t"}], "data": {"train": str(data)}}
    with pytest.raises(NoVerifierError, match=r"\['code', 'sql'\] have no verifier, and evaluation needs"):
        check_run_verifiers(parse_config(base))
    check_run_verifiers(parse_config({**base, "eval": {"every": 0}}))                  # no rewards needed
    check_run_verifiers(parse_config({**base, "eval": {"max_prompts": 1}}))             # only "add" is evaluated
    verifiers = {"train": str(data), "verifiers": {"code": "none", "sql": "exact"}}
    check_run_verifiers(parse_config({**base, "data": verifiers}))                       # eval leaves code out
    with pytest.raises(NoVerifierError, match=r"\['code'\] have no verifier, and loss.kind=kdrl needs"):
        check_run_verifiers(parse_config({**base, "data": verifiers, "loss": {"kind": "kdrl"}}))
