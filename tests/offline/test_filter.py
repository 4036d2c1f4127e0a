"""The offline filter (kept / dropped and why, recorded and readable) and the dataset source end to
end in process: import -> score -> filter -> sft -> iteration 0's student is the warm start."""
import json
import math

import numpy as np
import pyarrow as pa
import pytest

from opd_tasks.config import OfflineFilterConfig, parse_config
from opd_tasks.context import prepare_run
from opd_tasks.errors import DataError, OpdError
from opd_tasks.inspect import inspect_report
from opd_tasks.offline.dataset import import_dataset
from opd_tasks.offline.filter import filter_decisions, kept_rows, per_token_mean, run_offline_filter
from opd_tasks.offline.scoring import run_offline_scoring
from storage.manifest import read_manifest
from storage.shards import build_provenance, commit_parts, read_stage, rollout_table, scored_table, write_part
from tiny_world import tiny_config


def test_filter_decisions_by_hand():
    flt = OfflineFilterConfig(min_reward=0.5, min_teacher_logp_per_token=-1.0)
    reward = [1.0, 0.0, None, 1.0, 1.0, 1.0, float("nan")]
    tl = np.array([-0.2, -0.1, -0.1, -3.0, -1.0, math.nan, -0.1])
    lens = np.array([2, 1, 1, 2, 1, 0, 3])
    kept, why = filter_decisions(reward, tl, lens, flt)
    assert why == ["kept", "reward_below_min", "no_reward", "teacher_logp_below_min", "kept", "empty_response",
                   "no_reward"]
    assert kept == [True, False, False, False, True, False, False]
    # no thresholds: everything with a token is kept, rewards or not
    assert filter_decisions(reward, tl, lens, OfflineFilterConfig())[1] == ["kept"] * 5 + ["empty_response", "kept"]
    assert per_token_mean(pa.array([[-1.0, -2.0], [-4.0]], pa.list_(pa.float32()))).tolist() == [-1.5, -4.0]


def _scored_stage(ctx):
    """Five hand-made rows (combined teacher log-probs chosen to sit on both sides of -1 per token)."""
    T = {"s0": [-0.1, -0.3], "s1": [-0.1], "s2": [-0.5], "s3": [-2.0, -4.0], "s4": [-1.0]}
    reward = {"s0": 1.0, "s1": 0.0, "s2": None, "s3": 1.0, "s4": 1.0}
    ids = list(T)
    base = rollout_table({"sample_id": ids, "prompt_id": [f"p{i}" for i in range(5)], "group_index": [0] * 5,
                          "domain": ["x", "x", "y", "y", "y"], "prompt_ids": [np.array([5, 6], np.int32)] * 5,
                          "response_ids": [np.arange(7, 7 + len(T[s]), dtype=np.int32) for s in ids],
                          "behaviour_logp": pa.nulls(5, pa.list_(pa.float32())), "finish_reason": ["offline"] * 5,
                          "reward": [reward[s] for s in ids], "iteration": -1})
    per_teacher = {n: [np.array(T[s], np.float32) - 0.5 for s in ids] for n in ("tx", "ty")}
    table = scored_table(base, per_teacher, [np.array(T[s], np.float32) for s in ids])
    prov = build_provenance("scored", iteration=-1, config_hash=ctx.config_hash,
                            teachers=[{"name": "tx", "path": "x"}, {"name": "ty", "path": "y"}], combination="mixture")
    stage = ctx.offline_dir("scored")
    commit_parts(ctx.layout.fs, stage, "scored", {0: write_part(ctx.layout.fs, stage, 0, table, prov)}, ctx.config_hash)
    return table


def test_the_filter_stage_records_each_rows_decision_and_the_trainer_reads_only_kept_rows(tmp_path, tiny_world):
    cfg = tiny_config(tiny_world, offline={"filter": {"min_reward": 0.5, "min_teacher_logp_per_token": -1.0}})
    ctx = prepare_run(parse_config(cfg), str(tmp_path / "run"))
    table = _scored_stage(ctx)
    res = run_offline_filter(ctx)
    assert res.rows == 2 and res.metrics["reasons"] == {"kept": 2, "empty_response": 0, "no_reward": 1,
                                                        "reward_below_min": 1, "teacher_logp_below_min": 1}
    assert res.metrics["by_domain"] == {"x": {"kept": 1, "dropped": 1}, "y": {"kept": 1, "dropped": 2}}
    fs, fdir = ctx.layout.fs, ctx.offline_dir("filter")
    m = read_manifest(fs, fdir, verify=True)
    assert m.extra["filter"] == {"min_reward": 0.5, "min_teacher_logp_per_token": -1.0}
    d = json.loads(fs.cat_file(f"{fdir}/decisions.json"))
    assert dict(zip(d["sample_id"], d["reason"])) == {"s0": "kept", "s1": "reward_below_min", "s2": "no_reward",
                                                      "s3": "teacher_logp_below_min", "s4": "kept"}
    assert d["teacher_logp_per_token"][:2] == [pytest.approx(-0.2), pytest.approx(-0.1)]
    assert kept_rows(fs, ctx.offline_dir("scored"), table).column("sample_id").to_pylist() == ["s0", "s4"]
    assert run_offline_filter(ctx).skipped
    # inspect --offline shows the counts and examples per reason
    rep = inspect_report(ctx.run_dir, offline=True, top=1)
    assert rep["filter"]["kept"] == 2 and rep["filter"]["reasons"]["no_reward"] == 1
    assert [e["sample_id"] for e in rep["filter"]["examples"]["teacher_logp_below_min"]] == ["s3"]
    # decisions that do not match the scored rows are refused, not silently applied
    with pytest.raises(OpdError, match="do not match"):
        kept_rows(fs, ctx.offline_dir("scored"), table.slice(0, 4))


def test_a_filter_that_keeps_nothing_says_what_to_loosen(tmp_path, tiny_world):
    cfg = tiny_config(tiny_world, offline={"filter": {"min_reward": 2.0}})
    ctx = prepare_run(parse_config(cfg), str(tmp_path / "run"))
    _scored_stage(ctx)
    with pytest.raises(DataError, match=r"keeps none of the 5 rows.*loosen offline.filter \(min_reward 2.0.*largest "
                                        r"reward 1.0"):
        run_offline_filter(ctx)
    assert read_manifest(ctx.layout.fs, ctx.offline_dir("filter")) is None


def test_dataset_source_end_to_end_in_process(tmp_path, tiny_world):
    """Text prompt+response with answers: verifier rewards, min_reward keeps the right ones, sft on them
    moves the weights, and iteration 0's student (and G-OPD reference) is the warm start."""
    import torch
    from safetensors.torch import load_file

    from opd_tasks.trainer.stage import run_offline_training, train_paths
    torch.set_num_threads(2)
    # (the tiny world's WordLevel tokenizer decodes "ab" as "a b")
    rows = [{"prompt": "abc", "response": "ab", "answer": "a b", "domain": "x"},
            {"prompt": "bca", "response": "ba", "answer": "a b", "domain": "y"},
            {"prompt": "cab", "response": "ab", "answer": "a b", "domain": "y"}]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config(tiny_world, offline={"source": "dataset", "dataset": str(data), "epochs": 2, "mini_batches": 1,
                                           "lr": 1e-2, "filter": {"min_reward": 1.0}})
    ctx = prepare_run(parse_config(cfg), str(tmp_path / "run"))
    assert import_dataset(ctx).rows == 3
    rollout = read_stage(ctx.layout.fs, ctx.offline_dir("rollout"))
    assert rollout.column("reward").to_pylist() == [1.0, 0.0, 1.0]
    assert rollout.column("behaviour_logp").null_count == 3
    run_offline_scoring(ctx)
    assert run_offline_filter(ctx).metrics["reasons"]["reward_below_min"] == 1
    res = run_offline_training(ctx)
    assert res.stage == "offline-train" and res.rows == 2 and res.metrics["step"] == 2
    train = json.loads(ctx.layout.fs.cat_file(ctx.layout.join("offline", "train", "metrics.json")))
    assert train["loss_kind"] == "sft" and train["iteration"] == -1
    assert train["steps"][1]["nll"] < train["steps"][0]["nll"]  # lr 1e-2 on two rows: the data gets likelier
    warm = ctx.student_path(0)
    assert warm == ctx.layout.join("checkpoints", "offline", "hf") and ctx.reference_path == warm
    assert train_paths(ctx, 0)["init_checkpoint"] == warm
    before = load_file(f"{tiny_world['student']}/model.safetensors")
    after = load_file(f"{warm}/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert run_offline_training(ctx).skipped
