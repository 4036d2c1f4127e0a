"""`opd status` / `opd inspect`: the numbers against float64 hand computations, the reports, the CLI."""
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from opd_tasks.errors import ManifestError, OpdError
from opd_tasks.inspect import analyze, inspect_report, kl_estimates, mixture_share
from opd_tasks.render import render_inspect, render_status
from opd_tasks.status import status_report
from storage.layout import RunLayout
from storage.shards import build_provenance, rollout_table, scored_table

_spec = importlib.util.spec_from_file_location("storage_factories", Path(__file__).parent / "storage" / "factories.py")
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)


def test_kl_estimates_by_hand():
    b, t = np.array([-1.0, -2.0, np.nan]), np.array([-1.5, -0.5, -3.0])
    k1, k3 = kl_estimates(b, t)
    assert k1 == pytest.approx(((-1.0 + 1.5) + (-2.0 + 0.5)) / 2, abs=1e-12)
    r = [-0.5, 1.5]  # t - b
    assert k3 == pytest.approx(sum(math.exp(x) - x - 1 for x in r) / 2, abs=1e-12)
    assert k3 == pytest.approx(1.0441098650, abs=1e-9)  # (0.1065306597 + 1.9816890703) / 2


def test_mixture_share_by_hand():
    pa_, pb = np.log([0.5, 0.1]), np.log([0.25, 0.3])
    share = mixture_share({"a": pa_, "b": pb}, {"a": 3.0, "b": 1.0})
    a1 = 0.75 * 0.5 / (0.75 * 0.5 + 0.25 * 0.25)
    a2 = 0.75 * 0.1 / (0.75 * 0.1 + 0.25 * 0.3)
    assert share["a"] == pytest.approx((a1 + a2) / 2, abs=1e-12)
    assert share["b"] == pytest.approx(1 - (a1 + a2) / 2, abs=1e-12)
    assert mixture_share({"a": pa_, "b": pb}, {"a": 1.0, "b": 0.0}) == {"a": 1.0, "b": 0.0}


def _hand_table():
    """Two samples: s0 with 3 tokens, s1 with 2 tokens and no behaviour log-probs (offline row)."""
    b = [np.array([-0.1, -2.0, -0.5]), None]
    ta = [np.array([-0.2, -0.3, -4.0]), np.array([-1.0, -1.0])]
    tb = [np.array([-1.0, -1.0, -1.0]), np.array([-2.0, -0.5])]
    w = np.array([0.5, 0.5])
    comb = [np.logaddexp(np.log(w[0]) + x, np.log(w[1]) + y) for x, y in zip(ta, tb)]
    t = rollout_table({"sample_id": ["s0", "s1"], "prompt_id": ["p0", "p1"], "group_index": [0, 0],
                       "domain": ["math", None], "prompt_ids": [np.array([5, 6]), np.array([7])],
                       "response_ids": [np.array([10, 11, 12]), np.array([13, 14])], "behaviour_logp": b,
                       "finish_reason": ["stop", "length"], "reward": [1.0, None], "iteration": 0})
    t = scored_table(t, {"a": ta, "b": tb}, combined=comb)
    prov = build_provenance("scored", iteration=0, config_hash="h", combination="mixture",
                            teachers=[{"name": "a", "weight": 1.0}, {"name": "b", "weight": 1.0}])
    return t, prov, b, ta, tb, comb


def test_analyze_by_hand():
    t, prov, b, ta, tb, comb = _hand_table()
    rep = analyze(t, prov, top=2, sample="s0", decode=lambda ids: "".join(chr(97 + i - 10) for i in ids))
    json.dumps(rep, allow_nan=False)
    a, bb = rep["teachers"]
    f32 = lambda x: np.asarray(x, np.float32).astype(np.float64)  # values went through float32 storage
    assert a["mean_logp"] == pytest.approx(np.concatenate([f32(x) for x in ta]).mean(), abs=1e-6)
    assert a["kl_k1"] == pytest.approx(np.mean(f32(b[0]) - f32(ta[0])), abs=1e-6)   # s1 has no behaviour
    r = f32(tb[0]) - f32(b[0])
    assert bb["kl_k3"] == pytest.approx(np.mean(np.exp(r) - r - 1), abs=1e-6)
    pa_ = np.exp(np.concatenate([f32(x) for x in ta]))
    pb = np.exp(np.concatenate([f32(x) for x in tb]))
    assert a["mixture_share"] == pytest.approx(np.mean(pa_ / (pa_ + pb)), abs=1e-6)
    assert rep["combined"]["kl_k1"] == pytest.approx(np.mean(f32(b[0]) - f32(comb[0])), abs=1e-6)
    assert rep["samples"] == 2 and rep["tokens"] == 5
    assert rep["rewards"]["count"] == 1 and rep["rewards"]["missing"] == 1
    assert rep["lengths"]["response"]["max"] == 3 and rep["lengths"]["finish_reason"] == {"stop": 1, "length": 1}
    # only s0 has behaviour log-probs, so only it can disagree; its worst token is the last one
    assert [s["sample_id"] for s in rep["top_samples"]] == ["s0"]
    assert rep["top_samples"][0]["mean_abs_diff"] == pytest.approx(np.mean(np.abs(f32(b[0]) - f32(comb[0]))), abs=1e-6)
    worst = int(np.argmax(np.abs(f32(b[0]) - f32(comb[0]))))
    top = rep["top_tokens"][0]
    assert (top["sample_id"], top["position"], top["token_id"]) == ("s0", worst, 10 + worst)
    assert top["token"] == chr(97 + worst) and top["context"] == "abc"[:worst]
    view = rep["sample"]
    assert view["prompt_ids"] == [5, 6] and view["response"] == "abc"
    assert [x["teachers"]["b"] for x in view["tokens"]] == pytest.approx(tb[0].tolist(), abs=1e-6)
    assert view["tokens"][1]["diff"] == pytest.approx(float(f32(b[0])[1] - f32(comb[0])[1]), abs=1e-6)
    with pytest.raises(OpdError, match="sample_id 'nope' is not in this stage"):
        analyze(t, prov, sample="nope")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect")
    tok = F.make_tokenizer(str(base / "tok"))
    layout = F.make_run(str(base / "run"), iterations=2, tokenizer_path=tok)
    return layout, tok


def test_status_report(run):
    layout, _ = run
    rep = status_report(layout.root)
    json.dumps(rep, allow_nan=False)
    assert [i["iteration"] for i in rep["iterations"]] == [0, 1, 2]
    assert rep["iterations"][0]["stages"] == {s: "done" for s in ("rollout", "scored", "train", "eval")}
    assert rep["iterations"][2]["stages"] == {"rollout": "done", "scored": "partial", "train": "missing",
                                              "eval": "missing"}
    assert [i["checkpoint"] for i in rep["iterations"]] == ["done", "done", "partial"]
    assert rep["iterations"][0]["rows"] == {"rollout": 6, "scored": 6}
    assert rep["latest_checkpoint"] == {"iteration": 1, "path": layout.checkpoint_dir(1)}
    assert rep["iterations_planned"] == 4 and rep["offline"] is None
    with pytest.raises(OpdError, match="no run here"):
        status_report(layout.join("nothing"))


def test_inspect_report_decodes_with_the_shard_tokenizer(run):
    layout, tok_path = run
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_path)
    rep = inspect_report(layout.root, top=3, sample="1-p0-1")
    json.dumps(rep, allow_nan=False)
    assert rep["iteration"] == 1  # iteration 2's scored stage is not done
    assert rep["tokenizer"].startswith("decoded with")
    for t in rep["top_tokens"]:
        assert t["token"] == tok.decode([t["token_id"]])
    view = rep["sample"]
    assert view["response"] == tok.decode([x["token_id"] for x in view["tokens"]])
    assert len(rep["top_samples"]) == 3 and len(rep["top_tokens"]) == 3
    diffs = [s["mean_abs_diff"] for s in rep["top_samples"]]
    assert diffs == sorted(diffs, reverse=True)
    with pytest.raises(ManifestError, match="stage is partial"):
        inspect_report(layout.root, iteration=2)


def test_inspect_a_stage_directory_without_tokenizer(tmp_path):
    lay = RunLayout(str(tmp_path / "scored-out"))
    table, prov = F.make_scored_table(tokenizer_path=str(tmp_path / "gone"))
    F.write_stage(lay.fs, lay.root, table, prov)
    rep = inspect_report(lay.root, top=2)
    assert "unavailable" in rep["tokenizer"] and rep["top_tokens"][0]["token"] is None
    assert rep["samples"] == table.num_rows


def test_renderers(run, capsys):
    from rich.console import Console

    layout, _ = run
    con = Console(record=True, width=200)
    render_status(status_report(layout.root), console=con)
    render_inspect(inspect_report(layout.root, sample="1-p1-0"), console=con)
    text = con.export_text()
    assert "latest checkpoint: iteration 1" in text and "partial" in text
    assert "mixture share" in text and "sample 1-p1-0" in text


def test_cli(run):
    layout, _ = run
    runner = CliRunner()
    res = runner.invoke(app, ["status", layout.root, "--json"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["iterations"][1]["stages"]["train"] == "done" and rep["latest_checkpoint"]["iteration"] == 1
    res = runner.invoke(app, ["inspect", layout.root, "--iteration", "0", "--json", "--top", "2"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["iteration"] == 0
    res = runner.invoke(app, ["inspect", layout.root, "--iteration", "0"])
    assert res.exit_code == 0 and "teachers vs student" in res.output
    res = runner.invoke(app, ["inspect", layout.root, "--iteration", "0", "--sample", "zzz"])
    assert res.exit_code == 2 and "zzz" in res.output
