"""Tokenizer fingerprint and the teacher/student tokenizer check."""
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from opd_tasks.errors import ModelPathError, OpdError, TokenizerMismatchError
from opd_tasks.models import load_tokenizer
from opd_tasks.tokenizers import check_same_tokenizer, tokenizer_fingerprint


def save_tokenizer(path, words=("a", "b", "c", "d"), eos="</s>", extra_special=()):
    """A word-level tokenizer: <unk> <s> EOS <pad> then `words`, saved as an HF tokenizer dir."""
    toks = ["<unk>", "<s>", eos, "<pad>", *words]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(toks)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token=eos,
                                   pad_token="<pad>")
    if extra_special:
        fast.add_special_tokens({"additional_special_tokens": list(extra_special)})
    fast.save_pretrained(path)
    return path


def test_fingerprint_is_stable_across_reloads_and_copies(tmp_path):
    a = save_tokenizer(tmp_path / "a")
    b = save_tokenizer(tmp_path / "b")
    fp = tokenizer_fingerprint(a)
    assert len(fp) == 64
    assert tokenizer_fingerprint(a) == fp == tokenizer_fingerprint(b)
    assert tokenizer_fingerprint(load_tokenizer(a)) == fp
    assert check_same_tokenizer(a, b, "math") == fp


@pytest.mark.parametrize("change, expected", [
    (dict(words=("a", "b", "c", "d", "e")), r"vocabulary size 8 \(student\) vs 9 \(math\)"),
    (dict(words=("a", "x", "c", "d")), r"first differing token id 5: 'b' \(student\) vs 'x' \(math\)"),
    (dict(eos="<eos>"), r"special token eos_token: '</s>' \(student\) vs '<eos>' \(math\)"),
    (dict(extra_special=("<tool>",)), r"vocabulary size 8 \(student\) vs 9 \(math\)"),
])
def test_mismatch_names_both_models_and_the_difference(tmp_path, change, expected):
    student = save_tokenizer(tmp_path / "student")
    teacher = save_tokenizer(tmp_path / "teacher", **change)
    assert tokenizer_fingerprint(student) != tokenizer_fingerprint(teacher)
    with pytest.raises(TokenizerMismatchError, match=expected) as err:
        check_same_tokenizer(student, teacher, "math")
    msg = str(err.value)
    assert str(teacher) in msg and str(student) in msg and "Fix:" in msg
    assert isinstance(err.value, OpdError)


def test_special_flag_of_an_added_token_counts(tmp_path):
    a = save_tokenizer(tmp_path / "a", words=("a", "b"))
    tok = load_tokenizer(a)
    tok.add_tokens(["<tool>"])  # a plain added token
    tok.save_pretrained(tmp_path / "plain")
    tok = load_tokenizer(a)
    tok.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    tok.save_pretrained(tmp_path / "special")
    with pytest.raises(TokenizerMismatchError):
        check_same_tokenizer(tmp_path / "plain", tmp_path / "special", "code")


def test_missing_tokenizer_is_a_model_path_error(tmp_path):
    with pytest.raises(ModelPathError, match="nope' does not exist"):
        tokenizer_fingerprint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelPathError, match=r"(?s)empty.: cannot load a tokenizer .*tokenizer.save_pretrained"):
        tokenizer_fingerprint(tmp_path / "empty")
