"""teachers[].reference (G-OPD reward correction): each routed sample's ref_logp is scored by its
teacher's own base; bad references are named; the default reproduces the run reference's shard."""
import numpy as np
import pytest

from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.engines.hf import HFScorer
from opd_tasks.errors import ModelPathError, TokenizerMismatchError
from opd_tasks.rollout import run_rollout
from opd_tasks.scoring import run_scoring
from storage.shards import read_provenance, read_stage
from tiny_world import tiny_config


def _cfg(world, refs=None, **over):
    refs = refs or {}
    teachers = [{"name": n, "path": world[n], "domain": d, **({"reference": {"path": refs[n]}} if n in refs else {})}
                for n, d in (("tx", "x"), ("ty", "y"))]
    return parse_config(tiny_config(world, teachers=teachers, combination="route",
                                    loss={"kind": "gopd", "lambda": 1.25}, **over))


def _score(tmp_path, world, name, refs=None):
    ctx = prepare_run(_cfg(world, refs), str(tmp_path / name))
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    return ctx, read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))


def test_each_routed_sample_is_scored_by_its_teachers_reference(tmp_path, tiny_world):
    # tx's base: the ty model (any model with the student's tokenizer); ty keeps the run's reference
    ctx, table = _score(tmp_path, tiny_world, "own", {"tx": tiny_world["ty"]})
    prompts, responses = table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()
    ref = table.column("ref_logp").to_pylist()
    dom = table.column("domain").to_pylist()
    for path, d in ((tiny_world["ty"], "x"), (tiny_world["student"], "y")):
        rows = [i for i, x in enumerate(dom) if x == d]
        assert rows
        want = HFScorer(path, progress=False).score([prompts[i] for i in rows], [responses[i] for i in rows])
        for i, w in zip(rows, want):
            np.testing.assert_allclose(ref[i], w, atol=1e-5, rtol=0)
    prov = read_provenance(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert prov["teacher_references"] == {"tx": tiny_world["ty"], "ty": tiny_world["student"]}


def test_a_teacher_reference_equal_to_the_runs_gives_the_same_shard_bits(tmp_path, tiny_world):
    _, plain = _score(tmp_path, tiny_world, "plain")
    _, named = _score(tmp_path, tiny_world, "named", {"tx": tiny_world["student"], "ty": tiny_world["student"]})
    for c in ("ref_logp", "teacher_logp", "teacher_logp.tx", "teacher_logp.ty"):
        assert named.column(c).equals(plain.column(c)), c


def test_bad_teacher_references_are_named(tmp_path, tiny_world):
    with pytest.raises(Exception, match=r"teachers\[0\].reference.*loss.kind=gopd"):
        parse_config(tiny_config(tiny_world, combination="route", loss={"kind": "rkl"},
                                 teachers=[{"name": "tx", "path": "a", "domain": "x", "reference": {"path": "b"}},
                                           {"name": "ty", "path": "c", "domain": "y"}]))
    with pytest.raises(Exception, match=r"teachers\[0\].reference: per-teacher references need combination=route"):
        parse_config(tiny_config(tiny_world, teachers=[{"name": "tx", "path": "a", "reference": {"path": "b"}}]))
    missing = str(tmp_path / "no-such-base")
    ctx = prepare_run(_cfg(tiny_world, {"tx": missing}), str(tmp_path / "missing"))
    run_rollout(ctx, 0)
    with pytest.raises(ModelPathError, match=r"teacher 'tx'.s reference \(teachers\[\]\.reference\.path\)"):
        run_scoring(ctx, 0)
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent / "train"))
    from train_helpers import build_tiny_model
    other = build_tiny_model(tmp_path / "other-tok", seed=5)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    ctx = prepare_run(_cfg(tiny_world, {"ty": other}), str(tmp_path / "tok"))
    run_rollout(ctx, 0)
    with pytest.raises(TokenizerMismatchError, match="teacher 'ty'.s reference"):
        run_scoring(ctx, 0)


def test_the_runs_reference_is_not_loaded_when_every_teacher_names_its_own(tmp_path, tiny_world):
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.scoring import REF, get_scorers
    refs = {"tx": tiny_world["ty"], "ty": tiny_world["tx"]}
    cfg = prepare_run(_cfg(tiny_world, refs), str(tmp_path / "own")).cfg
    try:
        keys = set(get_scorers(cfg, with_ref=True, ref_path=tiny_world["student"]))
        assert keys == {"tx", "ty", REF + tiny_world["ty"], REF + tiny_world["tx"]}
        one = {"tx": tiny_world["ty"]}  # ty keeps the run's reference: it is loaded
        cfg = prepare_run(_cfg(tiny_world, one), str(tmp_path / "one")).cfg
        assert REF in get_scorers(cfg, with_ref=True, ref_path=tiny_world["student"])
    finally:
        ENGINES.close_all()
