"""scoring.top_k + loss.kind=topk through the stages on the tiny world (hf engines): the scored
shard holds each teacher's top-k aligned with its teacher_logp, training reads them, and
`opd inspect --sample` shows a token's alternatives per teacher."""
import numpy as np
import pytest

from tiny_world import tiny_config

K = 5


@pytest.mark.slow
def test_topk_scoring_training_and_inspect(tmp_path, tiny_world):
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.hf import HFScorer
    from opd_tasks.inspect import inspect_report
    from opd_tasks.rollout import run_rollout
    from opd_tasks.scoring import run_scoring
    from opd_tasks.trainer.stage import run_training
    from storage.shards import read_provenance, read_stage

    cfg = parse_config(tiny_config(tiny_world, combination="route", loss={"kind": "topk", "divergence": "jsd",
                                                                          "sampled_weight": 0.5},
                                   scoring={"top_k": K}))
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    run_rollout(ctx, 0)
    run_scoring(ctx, 0)
    stage = ctx.stage_dir(0, "scored")
    t = read_stage(ctx.layout.fs, stage)
    assert read_provenance(ctx.layout.fs, stage)["top_k"] == K
    prompts, responses = t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist()
    hits = 0
    for tc in cfg.teachers:
        direct = HFScorer(tc.path, progress=False).score_topk(prompts, responses, K)
        for r, d, ids, lp, own in zip(responses, direct, t.column(f"teacher_topk_ids.{tc.name}").to_pylist(),
                                      t.column(f"teacher_topk_logp.{tc.name}").to_pylist(),
                                      t.column(f"teacher_logp.{tc.name}").to_pylist()):
            if own is None:  # routed scoring: a teacher scores only its domain's rows, top-k null alike
                assert ids is None and lp is None
                continue
            ids, lp = np.asarray(ids).reshape(len(r), K), np.asarray(lp, np.float32).reshape(len(r), K)
            np.testing.assert_array_equal(ids, d.ids)  # position j: the top-k predicting response token j
            np.testing.assert_allclose(lp, d.topk_logp, rtol=0, atol=1e-5)  # other batches: float noise
            for j, tok in enumerate(r):  # the sampled token's teacher log-prob is its top-k entry
                hit = np.flatnonzero(ids[j] == tok)
                if hit.size:
                    hits += 1
                    assert lp[j, hit[0]] == np.float32(own[j])
    assert hits >= 3
    res = run_training(ctx, 0)
    assert res.rows == t.num_rows
    import json
    steps = json.loads(ctx.layout.fs.cat_file(ctx.stage_dir(0, "train") + "/metrics.json"))["steps"]
    assert all("topk_div" in s and "loss_sampled" in s for s in steps)
    sid = t.column("sample_id")[0].as_py()
    report = inspect_report(str(tmp_path / "run"), iteration=0, sample=sid)
    tok0 = report["sample"]["tokens"][0]
    teacher = {"x": "tx", "y": "ty"}[t.column("domain")[0].as_py()]  # routed: only its teacher scored it
    assert set(tok0["topk"]) == {teacher} and len(tok0["topk"][teacher]) == K
    from rich.console import Console
    from opd_tasks.render import render_inspect
    con = Console(record=True, width=200)
    render_inspect(report, con)
    assert "top-k alternatives" in con.export_text()
