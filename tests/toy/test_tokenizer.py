"""The toy tokenizer survives save + AutoTokenizer reload with the same ids, specials and padding side."""
import random

import pytest
from transformers import AutoTokenizer

from opd_tasks.toy.tasks import DOMAINS, TaskSpec, make_example
from opd_tasks.toy.tokenizer import ALPHABET, VOCAB, build_tokenizer


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    tok = build_tokenizer()
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return tok, AutoTokenizer.from_pretrained(path)


def test_reload_keeps_specials_and_left_padding(tokenizers):
    tok, reloaded = tokenizers
    for t in (tok, reloaded):
        assert (t.pad_token, t.bos_token, t.eos_token) == ("<pad>", "<bos>", "<eos>")
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
        assert t.padding_side == "left"
        assert len(t) == len(VOCAB) == 4 + len(ALPHABET)


def test_one_token_per_character_with_bos(tokenizers):
    tok, _ = tokenizers
    assert tok("add 12+3=")["input_ids"] == [1] + [VOCAB[c] for c in "add 12+3="]
    assert tok("0521", add_special_tokens=False)["input_ids"] == [VOCAB[c] for c in "0521"]
    assert tok.decode([VOCAB[c] for c in "rev abc="]) == "rev abc="


def test_round_trip_ids_of_many_prompts_and_answers(tokenizers):
    tok, reloaded = tokenizers
    rng = random.Random(0)
    spec = TaskSpec()
    for _ in range(300):
        prompt, answer = make_example(rng.choice(DOMAINS), rng, spec)
        for text, special in ((prompt, True), (answer, False), (prompt + answer, True)):
            ids = tok(text, add_special_tokens=special)["input_ids"]
            assert reloaded(text, add_special_tokens=special)["input_ids"] == ids
            assert len(ids) == len(text) + special
            assert reloaded.decode(ids, skip_special_tokens=True) == text
    batch = reloaded(["add 1+2=", "rev abcdef="], padding=True)["input_ids"]
    assert batch[0][:3] == [0, 0, 0] and batch[0][3] == 1  # left padding, then <bos>
