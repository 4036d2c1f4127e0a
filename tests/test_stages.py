"""Rollout and scoring stages on a tiny random world: what lands in the shards, resume, errors."""
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from opd_tasks.combine import mixture
from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.engines.hf import HFScorer
from opd_tasks.errors import DataError, TokenizerMismatchError
from opd_tasks.offline.score import score_offline
from opd_tasks.rollout import iteration_prompts, run_rollout
from opd_tasks.scoring import recombine, run_scoring, teacher_provenance
from storage.manifest import read_manifest
from storage.shards import read_provenance, read_stage
from tiny_world import tiny_config


def _ctx(tmp_path, world, **over):
    return prepare_run(parse_config(tiny_config(world, **over)), str(tmp_path / "run"))


def test_rollout_then_scoring_writes_aligned_teacher_and_reference_logprobs(tmp_path, tiny_world):
    ctx = _ctx(tmp_path, tiny_world)
    r = run_rollout(ctx, 0)
    assert r.rows == 12 and not r.skipped
    s = run_scoring(ctx, 0)
    assert s.rows == 12
    table = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert len(read_manifest(ctx.layout.fs, ctx.stage_dir(0, "scored")).parts) == 3  # 4 rows per part
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    # every teacher column is that teacher's own score of the sampled tokens (scored alone here)
    for name in ("tx", "ty"):
        direct = HFScorer(tiny_world[name]).score(prompts, responses)
        got = table.column(f"teacher_logp.{name}").to_pylist()
        for d, g in zip(direct, got):
            np.testing.assert_allclose(g, d, atol=1e-5)
    # the combination is the mixture of the stored columns with normalized weights 0.7 / 0.3
    flat = {n: np.concatenate(table.column(f"teacher_logp.{n}").to_pylist()).astype(np.float32) for n in ("tx", "ty")}
    np.testing.assert_allclose(np.concatenate(table.column("teacher_logp").to_pylist()),
                               mixture(flat, {"tx": 0.7, "ty": 0.3}), atol=1e-6)
    # G-OPD with lambda != 1 scores the reference: the initial student, which sampled these tokens
    ref = np.concatenate(table.column("ref_logp").to_pylist())
    behaviour = np.concatenate(table.column("behaviour_logp").to_pylist())
    np.testing.assert_allclose(ref, behaviour, atol=1e-4)
    prov = read_provenance(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert [t["name"] for t in prov["teachers"]] == ["tx", "ty"] and prov["combination"] == "mixture"
    assert prov["config_hash"] == ctx.config_hash and prov["tokenizer_fingerprint"]


def test_rollout_is_deterministic_and_rewarded(tmp_path, tiny_world):
    a = _ctx(tmp_path / "a", tiny_world)
    b = _ctx(tmp_path / "b", tiny_world)
    run_rollout(a, 0)
    run_rollout(b, 0)
    ta, tb = (read_stage(c.layout.fs, c.stage_dir(0, "rollout")) for c in (a, b))
    assert ta.equals(tb)
    assert set(ta.column("reward").to_pylist()) <= {0.0, 1.0}
    assert ta.column("sample_id").to_pylist()[0].startswith("i000000-")
    groups = ta.group_by("prompt_id").aggregate([("group_index", "count")])
    assert set(groups.column("group_index_count").to_pylist()) == {2}


def test_iteration_prompts_cover_the_data_before_repeating():
    table = pa.table({"prompt_id": [f"p{i}" for i in range(10)]})
    seen = [iteration_prompts(table, it, seed=0, n=5).column("prompt_id").to_pylist() for it in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(f"p{i}" for i in range(10))
    assert iteration_prompts(table, 0, 0, 5).equals(iteration_prompts(table, 0, 0, 5))


def test_interrupted_scoring_resumes_at_the_missing_part(tmp_path, tiny_world):
    ctx = _ctx(tmp_path, tiny_world)
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    stage = ctx.stage_dir(0, "scored")
    before = read_stage(ctx.layout.fs, stage)
    # simulate a crash after part 0: drop the manifest and the later parts
    os.remove(os.path.join(stage, "_MANIFEST.json"))
    os.remove(os.path.join(stage, "part-00002.parquet"))
    kept = os.stat(os.path.join(stage, "part-00000.parquet")).st_mtime_ns
    assert run_scoring(ctx, 0).rows == 12
    assert os.stat(os.path.join(stage, "part-00000.parquet")).st_mtime_ns == kept  # not redone
    assert read_stage(ctx.layout.fs, stage).equals(before)
    assert run_scoring(ctx, 0).skipped


def test_route_gives_each_sample_its_domain_teacher(tmp_path, tiny_world):
    ctx = _ctx(tmp_path, tiny_world, combination="route", loss={"kind": "rkl", "lambda": 1.0})
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    t = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert "ref_logp" not in t.column_names  # lambda = 1: no reference needed
    for row in t.to_pylist():
        assert row["teacher_logp"] == row[f"teacher_logp.t{row['domain']}"]


def test_recombine_uses_stored_columns_only(tmp_path, tiny_world):
    ctx = _ctx(tmp_path, tiny_world)
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    t = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    new_cfg = parse_config(tiny_config(tiny_world, teachers=[
        {"name": "tx", "path": "/nonexistent", "weight": 1.0}, {"name": "ty", "path": "/nonexistent", "weight": 0.0}]))
    re = recombine(t, new_cfg.combination, teacher_provenance(new_cfg))
    np.testing.assert_array_equal(np.concatenate(re.column("teacher_logp").to_pylist()),
                                  np.concatenate(t.column("teacher_logp.tx").to_pylist()))


def test_teacher_with_another_tokenizer_is_refused_by_name(tmp_path, tiny_world):
    import shutil
    other = tmp_path / "other"
    shutil.copytree(tiny_world["ty"], other)
    tok = other / "tokenizer.json"
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]  # same tokens, two ids swapped
    tok.write_text(json.dumps(spec))
    cfg = tiny_config(tiny_world)
    cfg["teachers"][1]["path"] = str(other)
    ctx = prepare_run(parse_config(cfg), str(tmp_path / "run"))
    run_rollout(ctx, 0)
    with pytest.raises(TokenizerMismatchError, match="teacher 'ty'"):
        run_scoring(ctx, 0)
    assert read_manifest(ctx.layout.fs, ctx.stage_dir(0, "scored")) is None


def test_prompt_set_without_domain_is_refused_for_routing(tmp_path, tiny_world):
    pq.write_table(pa.table({"prompt": ["abc", "de"]}), tmp_path / "p.parquet")
    ctx = _ctx(tmp_path, tiny_world, combination="route", data={"train": str(tmp_path / "p.parquet")})
    with pytest.raises(DataError, match="missing column 'domain'"):
        run_rollout(ctx, 0)


@pytest.mark.parametrize("form", ["text", "ids"])
def test_offline_scoring_of_a_dataset(tmp_path, tiny_world, form):
    from opd_tasks.models import load_tokenizer
    tok = load_tokenizer(tiny_world["student"])
    if form == "text":
        data = pa.table({"prompt": ["abc", "hello"], "response": ["cba", "olleh"], "domain": ["x", "y"]})
    else:
        data = pa.table({"prompt_ids": [tok("abc")["input_ids"], tok("hello")["input_ids"]],
                         "response_ids": [tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
                                          tok("olleh", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]})
    src = tmp_path / "data.parquet"
    pq.write_table(data, src)
    cfg = parse_config(tiny_config(tiny_world))
    res = score_offline(cfg, str(src), str(tmp_path / "out"))
    assert res.rows == 2
    from storage.fs import filesystem
    fs, path = filesystem(str(tmp_path / "out"))
    t = read_stage(fs, path)
    assert t.column("response_ids").to_pylist()[0][-1] == tok.eos_token_id
    assert t.column("behaviour_logp").null_count == 2
    direct = HFScorer(tiny_world["tx"]).score(t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist())
    for d, g in zip(direct, t.column("teacher_logp.tx").to_pylist()):
        np.testing.assert_allclose(g, d, atol=1e-5)
    assert score_offline(cfg, str(src), str(tmp_path / "out")).skipped
