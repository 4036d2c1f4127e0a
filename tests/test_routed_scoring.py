"""scoring.teachers: routed (each teacher scores only its domain's samples) against all: same bits
where the loss reads, half the teacher tokens with two teachers, nulls handled downstream."""
import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from opd_tasks.combine import CombinationError
from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.rollout import run_rollout
from opd_tasks.scoring import recombine, run_scoring, teacher_provenance
from opd_tasks.summary import teacher_kl
from opd_tasks.trainer.batching import rows_from_table
from opd_tasks.trainer.worker import TrainArgs, run as train_run
from storage.shards import read_stage, validate_table
from tiny_world import tiny_config

from opd_tasks.scoring import get_scorers as REAL_GET_SCORERS  # noqa: E402

ROUTE = {"combination": "route", "loss": {"kind": "rkl"}}


class Counting:
    """Wraps a scorer: counts the response tokens it is asked to score."""
    def __init__(self, inner):
        self.inner, self.tokens = inner, 0

    def score(self, prompts, responses):
        self.tokens += sum(len(r) for r in responses)
        return self.inner.score(prompts, responses)


def _scored(tmp_path, world, teachers, monkeypatch=None, counts=None):
    ctx = prepare_run(parse_config(tiny_config(world, **ROUTE, scoring={"teachers": teachers})),
                      str(tmp_path / teachers / "run"))
    run_rollout(ctx, 0)
    if counts is not None:
        import opd_tasks.scoring as scoring
        monkeypatch.setattr(scoring, "get_scorers", lambda *a, **k: {
            n: counts.setdefault(n, Counting(s)) for n, s in REAL_GET_SCORERS(*a, **k).items()})
    run_scoring(ctx, 0)
    return ctx, read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))


def test_routed_scores_half_the_teacher_tokens_and_keeps_the_routed_bits(tmp_path, tiny_world, monkeypatch):
    routed_counts, all_counts = {}, {}
    ctx_r, routed = _scored(tmp_path, tiny_world, "routed", monkeypatch, routed_counts)
    ctx_a, every = _scored(tmp_path, tiny_world, "all", monkeypatch, all_counts)
    response_tokens = int(pc.sum(pc.list_value_length(routed.column("response_ids"))).as_py())
    per_token = {k: sum(c.tokens for c in v.values()) / response_tokens
                 for k, v in (("routed", routed_counts), ("all", all_counts))}
    assert per_token == {"routed": 1.0, "all": 2.0}
    assert routed.column("response_ids").equals(every.column("response_ids"))
    # the combination the loss reads is the same bits; each teacher's column on its own rows too
    assert routed.column("teacher_logp").equals(every.column("teacher_logp"))
    dom = np.array(routed.column("domain").to_pylist())
    for name, d in (("tx", "x"), ("ty", "y")):
        col_r, col_a = routed.column(f"teacher_logp.{name}"), every.column(f"teacher_logp.{name}")
        own = np.flatnonzero(dom == d)
        assert 0 < len(own) < len(dom)
        assert col_r.take(own).equals(col_a.take(own))
        assert col_r.null_count == len(dom) - len(own) and col_a.null_count == 0
        assert pc.is_null(col_r.take(np.flatnonzero(dom != d))).to_pylist() == [True] * (len(dom) - len(own))
    validate_table(routed, "scored", source="routed shard")  # nulls are a valid scored shard
    # downstream readers: KL per teacher on its own domain is the same; the trainer reads NaN there
    kl = teacher_kl(ctx_r, 0)
    assert kl == teacher_kl(ctx_a, 0) and all(np.isfinite(v) for v in kl.values())
    rows = rows_from_table(routed, "t")
    x = rows.token["teacher_logp.tx"]
    assert all(bool(torch.isnan(x[i]).all()) == (dom[i] != "x") for i in range(len(dom)))


def test_route_run_trains_the_same_weights_under_routed_and_all(tmp_path, tiny_world):
    weights, metrics = {}, {}
    for teachers in ("routed", "all"):
        ctx, _ = _scored(tmp_path, tiny_world, teachers)
        out = str(tmp_path / teachers / "ckpt")
        metrics[teachers] = train_run(TrainArgs(ctx.layout.run_yaml, ctx.stage_dir(0, "scored"), tiny_world["student"], out,
                                                str(tmp_path / teachers / "train"), 0))
        from safetensors.torch import load_file
        import glob
        weights[teachers] = {k: v for f in sorted(glob.glob(f"{out}/hf/*.safetensors")) for k, v in load_file(f).items()}
    assert weights["routed"].keys() == weights["all"].keys()
    for k, v in weights["routed"].items():
        assert torch.equal(v, weights["all"][k]), k
    # per-teacher KL metrics: over the teacher's own samples when routed, finite either way
    steps = metrics["routed"]["steps"]
    assert all(np.isfinite(s["kl_k1/tx"]) and np.isfinite(s["kl_k1/ty"]) for s in steps)
    assert [s["loss"] for s in steps] == [s["loss"] for s in metrics["all"]["steps"]]


def test_routed_needs_route_and_a_routed_shard_cannot_become_a_mixture(tmp_path, tiny_world):
    with pytest.raises(Exception, match="scoring.teachers=routed needs combination=route"):
        parse_config(tiny_config(tiny_world, scoring={"teachers": "routed"}))
    ctx, routed = _scored(tmp_path, tiny_world, "routed")
    again = recombine(routed, "route", teacher_provenance(ctx.cfg))  # route -> route from the stored columns: the same bits
    assert again.column("teacher_logp").equals(routed.column("teacher_logp"))
    with pytest.raises(CombinationError, match="re-score with scoring.teachers: all"):
        recombine(routed, "mixture", teacher_provenance(ctx.cfg))


class Apart(Counting):
    """A scorer that only waits on a server (as RemoteEngine): each call meets the other teacher's
    call at a barrier, so the part cannot be scored with the teachers asked one after the other."""
    concurrent = True

    def __init__(self, inner, barrier):
        super().__init__(inner)
        self.barrier = barrier

    def score(self, prompts, responses):
        self.barrier.wait()  # BrokenBarrierError after 20 s when the other teacher is not asked meanwhile
        return super().score(prompts, responses)


def test_teachers_apart_from_this_process_are_asked_at_once_with_the_same_bits(tmp_path, tiny_world, monkeypatch):
    import threading

    import opd_tasks.scoring as scoring
    _, one_by_one = _scored(tmp_path / "seq", tiny_world, "all")
    barrier = threading.Barrier(2, timeout=20)
    monkeypatch.setattr(scoring, "get_scorers", lambda *a, **k: {
        n: Apart(s, barrier) for n, s in REAL_GET_SCORERS(*a, **k).items()})
    ctx = prepare_run(parse_config(tiny_config(tiny_world, **ROUTE, scoring={"teachers": "all"})),
                      str(tmp_path / "at-once" / "run"))
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    assert not barrier.broken
    assert read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored")).equals(one_by_one)
