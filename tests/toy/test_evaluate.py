"""Greedy evaluation: batched left-padded decoding equals one-by-one decoding; clear errors on bad input."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_tasks.errors import DataError, ModelPathError
from opd_tasks.evaluate import accuracy_by_domain, greedy_accuracy, greedy_generate, load_model


def test_batched_generation_equals_one_by_one(toy_world):
    import torch
    torch.set_num_threads(1)
    model, tok = load_model(str(toy_world / "teachers" / "rev"))
    rows = pq.read_table(toy_world / "data" / "eval.parquet").to_pylist()[:24]
    prompts = [r["prompt"] for r in rows]  # two domains, several prompt lengths: real left padding
    assert len({len(p) for p in prompts}) > 1
    batched = greedy_generate(model, tok, prompts, max_new_tokens=8)
    # token_budget=1 forces batches of one row: no padding at all
    single = greedy_generate(model, tok, prompts, max_new_tokens=8, token_budget=1)
    assert batched == single
    assert all("<eos>" not in r and "<pad>" not in r for r in batched)


def test_accuracy_by_domain_hand_counted():
    rows = [dict(prompt="p", answer="12", domain="add"), dict(prompt="p", answer="13", domain="add"),
            dict(prompt="p", answer="ab", domain="rev"), dict(prompt="p", answer="x", domain=None)]
    acc = accuracy_by_domain(rows, ["12", "12 ", "ab", "x"])
    assert acc == {"add": 0.5, "default": 1.0, "rev": 1.0}
    with pytest.raises(ValueError):
        accuracy_by_domain(rows, ["12"])  # one response per row


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
