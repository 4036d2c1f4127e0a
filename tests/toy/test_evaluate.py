"""Greedy evaluation on the rollout engine: equal to transformers' own greedy `generate` (the path
evaluation used before) on the toy world; batched equals one-by-one; clear errors on bad input."""
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_tasks.engines.base import SamplingParams
from opd_tasks.errors import DataError, ModelPathError
from opd_tasks.evaluate import accuracy_by_domain, evaluate, greedy_accuracy, greedy_responses
from opd_tasks.verifiers import NoVerifierError


def _transformers_greedy(path: str, prompts: list[str], max_new: int) -> list[str]:
    """The reference: one left-padded batch through transformers' generate(do_sample=False), cut at EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids, pad, eos = [tok(p)["input_ids"] for p in prompts], tok.pad_token_id, tok.eos_token_id
    width = max(map(len, ids))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
                             attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
                             do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=pad)
    rows = [r[: r.index(eos)] if eos in r else r for r in out[:, width:].tolist()]
    return [tok.decode(r, skip_special_tokens=False) for r in rows]


@pytest.mark.parametrize("model", ["student", "teachers/rev"])
def test_engine_accuracy_equals_transformers_generate(toy_world, model):
    import torch
    torch.set_num_threads(1)
    from opd_tasks.engines.hf import HFGenerator
    from opd_tasks.models import load_tokenizer
    path = str(toy_world / model)
    rows = pq.read_table(toy_world / "data" / "eval.parquet").to_pylist()  # 64 per domain
    want = _transformers_greedy(path, [r["prompt"] for r in rows], max_new=12)
    tok = load_tokenizer(path)
    got = greedy_responses(HFGenerator(path, progress=False), tok, [tok(r["prompt"])["input_ids"] for r in rows], 12)
    assert got == want
    acc = greedy_accuracy(path, rows, max_new_tokens=12)
    assert acc == accuracy_by_domain(rows, want) and 0 < sum(acc.values()) < 2


def test_batched_generation_equals_one_by_one(toy_world):
    from opd_tasks.engines.hf import HFGenerator
    from opd_tasks.models import load_tokenizer
    path = str(toy_world / "teachers" / "rev")
    tok = load_tokenizer(path)
    rows = pq.read_table(toy_world / "data" / "eval.parquet").to_pylist()[:24]
    ids = [tok(r["prompt"])["input_ids"] for r in rows]  # two domains, several prompt lengths: real left padding
    assert len({len(p) for p in ids}) > 1
    batched = greedy_responses(HFGenerator(path, progress=False), tok, ids, 8)
    single = greedy_responses(HFGenerator(path, token_budget=1, progress=False), tok, ids, 8)  # batches of one row
    assert batched == single
    assert all("<eos>" not in r and "<pad>" not in r for r in batched)
    # a greedy response stops at its first EOS (once there, a row is done even if EOS comes again)
    samples = HFGenerator(path, progress=False).generate(ids, 1, SamplingParams(temperature=0.0, max_new_tokens=8))
    assert all(s.response_ids.count(tok.eos_token_id) == (s.finish_reason == "stop") for (s,) in samples)


def test_accuracy_by_domain_hand_counted():
    rows = [dict(prompt="p", answer="12", domain="add"), dict(prompt="p", answer="13", domain="add"),
            dict(prompt="p", answer="ab", domain="rev"), dict(prompt="p", answer="x", domain=None),
            dict(prompt="p", answer="1/2", domain="algebra")]
    acc = accuracy_by_domain(rows, ["12", "12 ", "ab", "x", "\\boxed{0.5}"], {"algebra": "math"})
    assert acc == {"add": 0.5, "algebra": 1.0, "default": 1.0, "rev": 1.0}
    with pytest.raises(ValueError):
        accuracy_by_domain(rows, ["12"])  # one response per row
    with pytest.raises(NoVerifierError, match="algebra"):
        accuracy_by_domain(rows, ["12", "12 ", "ab", "x", "\\boxed{0.5}"])


def test_eval_skips_domains_declared_without_verifier_and_refuses_undeclared_ones():
    class Echo:  # a generator whose greedy answer is the prompt's last token
        def generate(self, prompt_ids, n, sampling):
            from opd_tasks.engines.base import Sample
            return [[Sample(response_ids=[p[-1]], behaviour_logp=None, finish_reason="length")] for p in prompt_ids]

    class Tok:
        chat_template, eos_token_id = None, 0

        def __call__(self, texts, add_special_tokens=True):
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

        def decode(self, ids, skip_special_tokens=False):
            return "".join(map(chr, ids))
    rows = [dict(prompt="q1", answer="1", domain="arith"), dict(prompt="q2", answer="3", domain="arith"),
            dict(prompt="code", answer="e", domain="code")]
    assert evaluate(Echo(), Tok(), rows, 4, verifiers={"arith": "exact", "code": "none"}) == {"arith": 0.5}
    with pytest.raises(NoVerifierError, match=r"\['code'\] have no verifier, and evaluation needs"):
        evaluate(Echo(), Tok(), rows, 4, verifiers={"arith": "exact"})


def test_greedy_accuracy_accepts_a_table_and_matches_rows(toy_world):
    table = pq.read_table(toy_world / "data" / "eval.parquet").slice(0, 16)
    import torch
    path, threads = str(toy_world / "student"), torch.get_num_threads()
    assert greedy_accuracy(path, table, max_new_tokens=8, num_threads=1) == \
        greedy_accuracy(path, table.to_pylist(), max_new_tokens=8)
    assert torch.get_num_threads() == threads          # num_threads applies to the call only


def test_bad_rows_and_bad_paths_are_user_errors(toy_world, tmp_path):
    with pytest.raises(DataError, match="lack columns.*answer"):
        greedy_accuracy(str(toy_world / "student"), [{"prompt": "add 1+2=", "domain": "add"}])
    with pytest.raises(DataError, match="lack columns.*domain"):
        greedy_accuracy(str(toy_world / "student"), pa.table({"prompt": ["x"], "answer": ["y"]}))
    with pytest.raises(DataError, match="empty"):
        greedy_accuracy(str(toy_world / "student"), [])
    with pytest.raises(ModelPathError, match=str(tmp_path)):
        greedy_accuracy(str(tmp_path), [{"prompt": "add 1+2=", "answer": "3", "domain": "add"}])


def test_hf_engines_get_the_configured_device(monkeypatch, tmp_path):
    """Rollout, eval and scoring hf engines are built on train.device ('auto': cuda when there is one)."""
    import torch

    import opd_tasks.engines as engines
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.rollout import get_generator, teacher_generator
    cfg = {"student": {"path": "s"}, "teachers": [{"name": "t", "path": "t"}], "data": {"train": "x.parquet"},
           "train": {"device": "cpu"}}
    made = []
    monkeypatch.setattr(engines, "make_generator", lambda kind, path, **opts: made.append(opts) or SimpleNamespace())
    ctx = prepare_run(parse_config(cfg), str(tmp_path / "run"))
    get_generator(ctx, "s"), teacher_generator(ctx.cfg, ctx.cfg.teachers[0])
    ENGINES.close_all()
    assert [o["device"] for o in made] == ["cpu", "cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert engines.hf_device(parse_config({**cfg, "train": {"device": "auto"}})) == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.hf_device(parse_config({**cfg, "train": {"device": "auto"}})) == "cpu"
    with pytest.raises(engines.EngineInputError, match="train.device=cuda"):
        engines.hf_device(parse_config({**cfg, "train": {"device": "cuda"}}))
