import pytest

from opd_tasks.verifiers import exact, get_verifier, normalize, register_verifier


@pytest.mark.parametrize("domain", ["add", "rev", "never-registered", None])
def test_builtin_verifiers(domain):
    v = get_verifier(domain)
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


def test_unknown_domain_is_exact():
    assert get_verifier("whatever") is exact
    assert get_verifier(None) is exact
    assert normalize(" ab <eos> ") == "ab"


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
