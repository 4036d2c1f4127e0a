"""The batching plan: shuffles, packing, rank slices, collation, and the errors on bad shards."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from opd_tasks.trainer import TrainError
from opd_tasks.trainer.batching import collate, group_ids, mini_batches, pack, rank_plan, rows_from_table
from opd_tasks.trainer.loop import _Metrics
from train_helpers import scored_table


def test_mini_batches_partition_and_depend_on_seed_iteration_epoch():
    a = mini_batches(10, 3, seed=0, iteration=2, epoch=0)
    assert [len(x) for x in a] == [4, 3, 3]
    assert sorted(torch.cat(a).tolist()) == list(range(10))
    again = mini_batches(10, 3, seed=0, iteration=2, epoch=0)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    orders = {tuple(torch.cat(mini_batches(10, 3, s, i, e)).tolist()) for s, i, e in
              [(0, 2, 0), (0, 2, 1), (0, 3, 0), (1, 2, 0)]}
    assert len(orders) == 4
    assert len(mini_batches(2, 5, 0, 0, 0)) == 2  # never an empty mini-batch


def test_pack_respects_budget_and_keeps_every_row():
    lengths = torch.tensor([5, 9, 3, 12, 7, 7, 2])
    micro = pack(list(range(7)), lengths, token_budget=16)
    assert sorted(i for mb in micro for i in mb) == list(range(7))
    for mb in micro:
        assert len(mb) * max(int(lengths[i]) for i in mb) <= 16 or len(mb) == 1
    assert pack([0, 1], torch.tensor([40, 3]), token_budget=16) == [[0], [1]]  # too long: alone


@pytest.mark.parametrize("world", [1, 2, 3])
def test_rank_plan_covers_the_mini_batch_once_with_equal_counts(world):
    lengths = torch.randint(2, 20, (11,), generator=torch.Generator().manual_seed(0))
    mini = torch.tensor([3, 0, 7, 1, 9, 4, 10])
    plans = [rank_plan(mini, lengths, 24, r, world) for r in range(world)]
    assert len({len(p) for p in plans}) == 1
    rows = [i for p in plans for mb in p if mb is not None for i in mb]
    assert sorted(rows) == sorted(mini.tolist())


def test_rank_plan_gives_dummies_to_ranks_without_rows():
    plans = [rank_plan(torch.tensor([4]), torch.full((5,), 3), 100, r, 2) for r in range(2)]
    assert plans == [[[4]], [None]]


def test_collate_pads_right_and_aligns_response_columns():
    t = scored_table(n_prompts=2, group=2, seed=3)
    rows = rows_from_table(t, "src")
    mb = collate(rows, [2, 0])
    for b, i in enumerate([2, 0]):
        p = t.column("prompt_ids")[i].as_py()
        r = t.column("response_ids")[i].as_py()
        n = len(p) + len(r)
        assert mb["input_ids"][b, :n].tolist() == p + r
        assert mb["attention_mask"][b].tolist() == [1] * n + [0] * (mb["input_ids"].shape[1] - n)
        assert int(mb["start"][b]) == len(p) and int(mb["response_len"][b]) == len(r)
        assert mb["mask"][b].tolist() == [True] * len(r) + [False] * (mb["mask"].shape[1] - len(r))
        want = np.array(t.column("teacher_logp.math")[i].as_py(), dtype=np.float32)
        np.testing.assert_array_equal(mb["teacher_logp.math"][b, :len(r)].numpy(), want)
        assert torch.all(mb["teacher_logp"][b, len(r):] == 0)


def test_group_ids_follow_prompt_id():
    assert group_ids(["a", "b", "a", "c", "b"]).tolist() == [0, 1, 0, 2, 1]


def test_metrics_combine_token_weighted_sum_and_max():
    acc = _Metrics("rkl")
    acc.add({"loss": 0.5, "kl_k1": 1.0, "ratio_max": 1.5, "tokens": 2.0, "sequences": 1.0})
    acc.add({"loss": 0.25, "kl_k1": 4.0, "ratio_max": 1.1, "tokens": 6.0, "sequences": 2.0})
    out = acc.reduce(["loss", "kl_k1", "ratio_max", "tokens", "sequences"], torch.device("cpu"))
    assert out["loss"] == 0.75  # shares of one normalizer add up
    assert out["kl_k1"] == pytest.approx((2 * 1.0 + 6 * 4.0) / 8)
    assert out["ratio_max"] == 1.5 and out["tokens"] == 8 and out["sequences"] == 3
    kd = _Metrics("kdrl")
    kd.add({"reward_mean": 1.0, "tokens": 10.0, "sequences": 1.0})
    kd.add({"reward_mean": 0.0, "tokens": 1.0, "sequences": 3.0})
    assert kd.reduce(["reward_mean", "tokens", "sequences"], torch.device("cpu"))["reward_mean"] == 0.25


def test_missing_column_names_it_and_the_fix():
    t = scored_table().drop_columns(["teacher_logp"])
    with pytest.raises(TrainError, match=r"src.*'teacher_logp'.*re-run scoring"):
        rows_from_table(t, "src")
    with pytest.raises(TrainError, match=r"ref_logp.*gopd"):
        rows_from_table(scored_table(), "src", need_ref=True)


def test_misaligned_logprobs_are_refused():
    t = scored_table(n_prompts=2, group=1)
    bad = pa.array([[-1.0] * (len(r.as_py()) + 1) for r in t.column("response_ids")], pa.list_(pa.float32()))
    t = t.set_column(t.column_names.index("teacher_logp"), "teacher_logp", bad)
    with pytest.raises(TrainError, match=r"'teacher_logp' row 0 \(sample_id 's0'.*\) has \d+ values for \d+ response tokens"):
        rows_from_table(t, "src")


def test_kdrl_needs_every_reward_and_tis_needs_behaviour():
    t = scored_table(n_prompts=2, group=2)
    t = t.set_column(t.column_names.index("reward"), "reward", pa.array([1.0, None, 0.0, 1.0], pa.float32()))
    with pytest.raises(TrainError, match=r"'reward' has 1 null rows.*kdrl"):
        rows_from_table(t, "src", need_reward=True)
    rows_from_table(t, "src")  # rkl does not read rewards
    t = t.set_column(t.column_names.index("behaviour_logp"), "behaviour_logp",
                     pa.nulls(4, pa.list_(pa.float32())))
    with pytest.raises(TrainError, match=r"behaviour_logp.*tis_cap: null"):
        rows_from_table(t, "src")
    assert "behaviour_logp" not in rows_from_table(t, "src", need_behaviour=False).token
