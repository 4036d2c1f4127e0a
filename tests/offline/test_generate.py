"""Teacher generation (the offline phase's data, `opd generate`): rollout shards sampled by a teacher,
whose behaviour log-probs are that teacher's own (checked against its teacher-forced scoring)."""
import numpy as np
import pytest

from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.errors import DataError
from opd_tasks.offline.scoring import run_offline_scoring
from opd_tasks.offline.generate import generate_offline, run_offline_generation
from storage.fs import filesystem
from storage.manifest import read_manifest
from storage.shards import read_provenance, read_stage
from tiny_world import tiny_config

def _cfg(world, model="route", **gen):
    return tiny_config(world, teachers=[{"name": "tx", "path": world["tx"], "domain": "x"},
                                        {"name": "ty", "path": world["ty"], "domain": "y"}],
                       combination="route", loss={"kind": "rkl"},
                       offline={"generate": {"model": model, "prompts": 6, "group_size": 2, "max_new_tokens": 5, **gen}})


def test_route_generation_records_the_teachers_own_logprobs_and_rewards(tmp_path, tiny_world):
    # scoring.teachers: all, so that each teacher also scores the other's samples (checked below)
    ctx = prepare_run(parse_config({**_cfg(tiny_world), "scoring": {"teachers": "all"}}), str(tmp_path / "run"))
    res = run_offline_generation(ctx)
    assert res.rows == 12 and not res.skipped
    rollout = read_stage(ctx.layout.fs, ctx.offline_dir("rollout"))
    assert set(rollout.column("iteration").to_pylist()) == {-1}
    for sid, dom in zip(rollout.column("sample_id").to_pylist(), rollout.column("domain").to_pylist()):
        assert sid.startswith(f"off-t{dom}-"), (sid, dom)  # the teacher of the prompt's domain sampled it
    assert set(rollout.column("reward").to_pylist()) <= {0.0, 1.0}  # verifier rewards (answers present)
    part0 = ctx.layout.join("offline", "rollout", "part-00000.parquet")
    prov = read_provenance(ctx.layout.fs, part0)
    assert prov["generator"] == {"teacher": "tx", "path": tiny_world["tx"]} and prov["iteration"] == -1

    # alignment: the recorded behaviour log-prob of each token is the generating teacher's teacher-forced
    # log-prob of it (scored by a different code path: HFScorer, right padding, no KV cache)
    run_offline_scoring(ctx)
    scored = read_stage(ctx.layout.fs, ctx.offline_dir("scored"))
    b = scored.column("behaviour_logp").to_pylist()
    for name in ("tx", "ty"):
        T = scored.column(f"teacher_logp.{name}").to_pylist()
        rows = [i for i, s in enumerate(scored.column("sample_id").to_pylist()) if s.startswith(f"off-{name}-")]
        assert rows
        for i in rows:
            np.testing.assert_allclose(b[i], T[i], atol=2e-5, rtol=0)
    other = [i for i, s in enumerate(scored.column("sample_id").to_pylist()) if s.startswith("off-tx-")]
    T_other = scored.column("teacher_logp.ty").to_pylist()
    assert max(abs(np.subtract(b[i], T_other[i])).max() for i in other) > 1e-2  # the other teacher disagrees
    assert read_manifest(ctx.layout.fs, ctx.offline_dir("scored")).rows == 12


def test_a_named_teacher_samples_every_prompt_and_a_resume_rewrites_only_missing_parts(tmp_path, tiny_world):
    cfg = parse_config(_cfg(tiny_world, model="ty"))
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    fs, stage = ctx.layout.fs, ctx.offline_dir("rollout")
    first = run_offline_generation(ctx)
    assert first.rows == 12
    before = read_stage(fs, stage)
    assert all(s.startswith("off-ty-") for s in before.column("sample_id").to_pylist())
    assert set(before.column("domain").to_pylist()) == {"x", "y"}
    # a crash after part 0: manifest and later parts gone
    fs.rm_file(f"{stage}/_MANIFEST.json")
    fs.rm_file(f"{stage}/part-00002.parquet")
    mtime0 = fs.info(f"{stage}/part-00000.parquet")["mtime"]
    again = run_offline_generation(ctx)
    assert again.rows == 12 and again.tokens > 0
    assert fs.info(f"{stage}/part-00000.parquet")["mtime"] == mtime0
    assert read_stage(fs, stage).equals(before)  # same seeds: the same samples
    assert run_offline_generation(ctx).skipped


def test_generation_outside_a_run_and_bad_inputs(tmp_path, tiny_world):
    cfg = parse_config(_cfg(tiny_world))
    fs, path = filesystem(str(tmp_path / "gen"))
    res = generate_offline(cfg, fs, path, model="tx", prompts=3, group_size=1, temperature=0.7, max_new_tokens=4,
                           config_hash=cfg.config_hash())
    assert res.rows == 3 and read_manifest(fs, path).extra["temperature"] == 0.7
    with pytest.raises(DataError, match=r"'nobody' is not a teacher"):
        generate_offline(cfg, fs, str(tmp_path / "g2"), model="nobody", prompts=3, group_size=1, temperature=1.0,
                         max_new_tokens=4, config_hash="x")
    odd = parse_config(tiny_config(tiny_world, teachers=[{"name": "tx", "path": tiny_world["tx"], "domain": "x"},
                                                         {"name": "ty", "path": tiny_world["ty"], "domain": "w"}],
                                   combination="route", loss={"kind": "rkl"}))
    with pytest.raises(DataError, match=r"no teacher has domain\(s\) \['y'\]"):
        generate_offline(odd, fs, str(tmp_path / "g3"), model="route", prompts=6, group_size=1, temperature=1.0,
                         max_new_tokens=4, config_hash="x")
