"""Prompt datasets: answers are right, prompts unique, train/eval disjoint, domains interleaved."""
import random

import pyarrow.parquet as pq
import pytest

from opd_tasks.toy.tasks import COLUMNS, SFTSampler, TaskSpec, make_example, make_splits, write_rows


def test_examples_are_correct():
    rng = random.Random(1)
    spec = TaskSpec(max_digits=3, min_letters=3, max_letters=6)
    for _ in range(500):
        prompt, answer = make_example("add", rng, spec)
        a, b = prompt.removeprefix("add ").removesuffix("=").split("+")
        assert len(a) == len(b) == 3 and len(answer) == 4
        assert int(answer) == int(a) + int(b)
        prompt, answer = make_example("rev", rng, spec)
        word = prompt.removeprefix("rev ").removesuffix("=")
        assert 3 <= len(word) <= 6 and word.isalpha() and answer == word[::-1]
    with pytest.raises(ValueError, match="unknown toy domain"):
        make_example("sort", rng, spec)


def test_splits_unique_disjoint_interleaved_and_deterministic(tmp_path):
    spec = TaskSpec(max_digits=2, min_letters=3, max_letters=4)
    splits = make_splits(spec, n_train=200, n_eval=50, seed=3)
    train, ev = splits["train"], splits["eval"]
    assert len(train) == 400 and len(ev) == 100
    prompts = [r["prompt"] for r in train + ev]
    assert len(set(prompts)) == len(prompts)
    ids = [r["prompt_id"] for r in train + ev]
    assert len(set(ids)) == len(ids)
    assert [r["domain"] for r in ev[:4]] == ["add", "rev", "add", "rev"]
    assert make_splits(spec, 200, 50, seed=3) == splits
    assert make_splits(spec, 200, 50, seed=4) != splits
    with_dev = make_splits(spec, 200, 50, seed=3, n_dev=20)
    assert with_dev["eval"] == ev                       # eval does not move when a dev split is added
    dev = [r["prompt"] for r in with_dev["dev"]]
    assert len(dev) == 40 and not set(dev) & {r["prompt"] for r in with_dev["train"] + ev}

    write_rows(train, tmp_path / "d" / "train.parquet")
    table = pq.read_table(tmp_path / "d" / "train.parquet")
    assert tuple(table.column_names) == COLUMNS
    assert table.to_pylist() == train
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["train.parquet"]  # no temp file left


def test_too_small_a_task_space_fails_clearly():
    with pytest.raises(ValueError, match="unique 'add' prompts"):
        make_splits(TaskSpec(max_digits=1), n_train=200, n_eval=0, seed=0)


def test_sft_sampler_respects_exclusions_and_weights():
    spec = TaskSpec(max_digits=1, min_letters=3, max_letters=3)
    exclude = {f"add {a}+{b}=" for a in range(10) for b in range(5)}
    sampler = SFTSampler(spec, exclude, seed=0)
    batch = sampler.batch(300, {"add": 1.0})
    assert all(p not in exclude and d == "add" for p, _, d in batch)
    mixed = sampler.batch(400, {"add": 1.0, "rev": 0.25})
    n_rev = sum(d == "rev" for _, _, d in mixed)
    assert 50 <= n_rev <= 110                               # expected 80 (binomial sd ~8)
    assert SFTSampler(spec, exclude, seed=0).batch(300, {"add": 1.0}) == batch  # a function of the seed
