"""`opd inspect --html`: the page opened in headless Chromium (real mouse events over the DevTools
protocol) shows the shard's samples in disagreement order and, for a hovered or pinned token, the
shard's own values; plus the sampling of large iterations, KL per teacher on its domain, and the
offline phase with the filter's reasons. Without Chromium the browser test fails with the install
command (tests/browser.py)."""
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from browser import Chromium, find_chromium
from flows.cli import app
from opd_tasks.inspect_html import view_data
from opd_tasks.inspect_page import PAGE
from storage.layout import RunLayout
from storage.shards import read_stage

_spec = importlib.util.spec_from_file_location("storage_factories", Path(__file__).parent / "storage" / "factories.py")
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)
ROOT = Path(__file__).resolve().parents[1]
K = 3


def _with_topk(table: pa.Table, name: str, rng) -> pa.Table:
    """teacher_topk_ids/logp.NAME as storage writes them: per token K distinct ids with sorted
    log-probs, K per token in one flat list per row (provenance top_k = K)."""
    ids, lps = [], []
    for n in [len(r) for r in table.column("response_ids").to_pylist()]:
        ids.append([i for _ in range(n) for i in rng.choice(32, K, replace=False).tolist()])
        lps.append([v for _ in range(n) for v in np.sort(np.log(rng.dirichlet(np.ones(K + 1))[:K]))[::-1].tolist()])
    table = table.append_column("teacher_topk_ids." + name, pa.array(ids, pa.list_(pa.int32())))
    return table.append_column("teacher_topk_logp." + name, pa.array(lps, pa.list_(pa.float32())))


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    base = tmp_path_factory.mktemp("inspect-html")
    tok = F.make_tokenizer(str(base / "tok"))
    table, prov = F.make_scored_table(n_prompts=4, group_size=3, tokenizer_path=tok, with_ref=True, seed=3)
    for t, d in zip(prov["teachers"], ("math", "code")):
        t["domain"] = d
    table = _with_topk(table, "math", np.random.default_rng(1))
    prov["top_k"] = K
    layout = RunLayout(str(base / "run"))
    F.write_stage(layout.fs, layout.stage_dir(0, "scored"), table, prov, rows_per_part=5)
    out = base / "view.html"
    res = CliRunner().invoke(app, ["inspect", layout.root, "--iteration", "0", "--html", str(out)])
    assert res.exit_code == 0, res.output
    assert "12 of 12 samples" in res.output
    rows = read_stage(layout.fs, layout.stage_dir(0, "scored")).to_pylist()
    return layout, out, rows


def _disagreement(r: dict) -> float:
    return float(np.mean(np.abs(np.float64(r["behaviour_logp"]) - np.float64(r["teacher_logp"]))))


def test_the_page_in_chromium_shows_the_shards_values(view, tmp_path):
    layout, out, rows = view
    html = out.read_text()
    assert not re.search(r"<link|src=|@import|url\(", PAGE) and "http" not in PAGE  # self-contained
    by_id = {r["sample_id"]: r for r in rows}
    order = sorted(by_id, key=lambda s: -_disagreement(by_id[s]))
    with Chromium(find_chromium(), tmp_path / "profile") as br:
        br.open(out.as_uri(), ready="document.body.dataset.ready === '1'")
        assert br.eval("performance.getEntriesByType('resource').length") == 0  # nothing fetched
        ids = br.eval("[...document.querySelectorAll('.sample')].map(e => e.dataset.sampleId)")
        assert ids == order  # most disagreeing first
        assert br.eval("document.getElementById('count').textContent").startswith("showing 12 of 12 samples")

        # hover: the details panel holds this token's values from the shard
        sid, p = order[1], 1
        r = by_id[sid]
        tok = f".tok[data-s='1'][data-p='{p}']"
        br.hover(tok)
        fields = br.eval("Object.fromEntries([...document.querySelectorAll('#details [data-value]')]"
                         ".filter(e => e.dataset.field).map(e => [e.dataset.field, e.dataset.value]))")
        expect = {"b": r["behaviour_logp"][p], "T": r["teacher_logp"][p], "t.math": r["teacher_logp.math"][p],
                  "t.code": r["teacher_logp.code"][p], "ref": r["ref_logp"][p],
                  "gap": r["teacher_logp"][p] - r["behaviour_logp"][p],
                  "gap.code": r["teacher_logp.code"][p] - r["behaviour_logp"][p]}
        assert {k: float(fields[k]) for k in expect} == pytest.approx(expect, abs=2e-6)
        assert br.eval("document.querySelector('#details b').textContent") == sid
        alts = br.eval("[...document.querySelectorAll(\"#details [data-field='topk.math'] .alt\")]"
                       ".map(e => [+e.dataset.id, +e.dataset.value])")
        assert [a[0] for a in alts] == r["teacher_topk_ids.math"][p * K:(p + 1) * K]
        assert [a[1] for a in alts] == pytest.approx(r["teacher_topk_logp.math"][p * K:(p + 1) * K], abs=1e-6)
        assert br.eval("document.querySelector(\"#details [data-field='topk.code']\")") is None  # not stored

        # click pins: hovering elsewhere keeps the pinned token until it is clicked again
        br.click(tok)
        br.hover(".tok[data-s='0'][data-p='0']")
        assert br.eval("document.querySelector('#details b').textContent") == sid
        br.click(tok)
        br.hover(".tok[data-s='0'][data-p='0']")
        assert br.eval("document.querySelector('#details b').textContent") == order[0]

        # color by one teacher: alpha = min(1, |T.code - b| / scale) * 0.8, red where the teacher is lower
        br.select("#metric", "t:code")
        bg = br.eval(f"document.querySelector(\"{tok}\").style.background")
        g = expect["gap.code"]
        rgba = [float(x) for x in re.findall(r"[\d.]+", bg)]
        assert rgba[:3] == ([220, 40, 40] if g < 0 else [40, 100, 230]) and rgba[3] == pytest.approx(
            min(1, abs(g) / 3) * 0.8, abs=2e-3)

        # filters: domain, then reward >= 1
        visible = "[...document.querySelectorAll('.sample:not(.hidden)')].map(e => e.dataset.sampleId)"
        br.select("#domain", "math")
        assert br.eval(visible) == [s for s in order if by_id[s]["domain"] == "math"]
        br.select("#rmin", "1", event="input")
        assert br.eval(visible) == [s for s in order if by_id[s]["domain"] == "math" and by_id[s]["reward"] >= 1]
        br.select("#domain", "*")
        br.select("#rmin", "", event="input")
        br.click(".tok[data-s='2'][data-p='0']")  # a pinned token for the screenshot, from the top
        br.eval("window.scrollTo(0, 0)")
        shot = br.screenshot(tmp_path / "inspect.png")
        (ROOT / ".cache" / "screenshots").mkdir(parents=True, exist_ok=True)
        (ROOT / ".cache" / "screenshots" / "inspect-html.png").write_bytes(shot.read_bytes())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert len(html) < 200_000


def test_large_iterations_are_sampled_and_kl_is_per_teacher_on_its_domain(view):
    layout, _, rows = view
    data = view_data(layout.root, iteration=0, max_samples=6)
    json.dumps(data, allow_nan=False)
    s = data["summary"]
    assert (s["samples"], s["shown"]) == (12, 6) and "3 most disagreeing" in s["sampled"]
    shown = [x["id"] for x in data["samples"]]
    worst = sorted(rows, key=lambda r: -_disagreement(r))
    assert shown[:3] == [r["sample_id"] for r in worst[:3]]
    assert [x["disagreement"] for x in data["samples"]] == sorted((x["disagreement"] for x in data["samples"]),
                                                                  reverse=True)
    assert len(set(shown)) == 6
    for name in ("math", "code"):
        own = [r for r in rows if r["domain"] == name]
        b = np.concatenate([np.float64(r["behaviour_logp"]) for r in own])
        t = np.concatenate([np.float64(r[f"teacher_logp.{name}"]) for r in own])
        kl = s["teacher_kl_on_domain"][name]
        assert kl["tokens"] == b.size and kl["kl_k1"] == pytest.approx(np.mean(b - t), abs=1e-5)
        assert kl["kl_k3"] == pytest.approx(np.mean(np.expm1(t - b) - (t - b)), abs=1e-5)


def test_offline_view_shows_the_filters_reasons(tmp_path, tiny_world):
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.offline.filter import run_offline_filter
    from tiny_world import tiny_config

    ctx = prepare_run(parse_config(tiny_config(tiny_world, offline={"filter": {"min_reward": 0.5}})),
                      str(tmp_path / "run"))
    table, prov = F.make_scored_table(n_prompts=3, group_size=2, iteration=-1, teachers=("tx", "ty"))
    i = table.column_names.index("behaviour_logp")
    table = table.set_column(i, table.schema.field(i), pa.nulls(table.num_rows, pa.list_(pa.float32())))
    F.write_stage(ctx.layout.fs, ctx.offline_dir("scored"), table, prov)
    run_offline_filter(ctx)
    out = tmp_path / "offline.html"
    res = CliRunner().invoke(app, ["inspect", ctx.run_dir, "--offline", "--html", str(out)])
    assert res.exit_code == 0, res.output
    data = view_data(ctx.run_dir, offline=True)
    reward = dict(zip(table.column("sample_id").to_pylist(), table.column("reward").to_pylist()))
    assert {x["id"]: x["filter"] for x in data["samples"]} == {
        k: "kept" if v >= 0.5 else "reward_below_min" for k, v in reward.items()}
    assert all(x["b"] is None and x["disagreement"] is None for x in data["samples"])
    assert data["summary"]["offline"] and sum(data["summary"]["filter"].values()) == 6
    # no behaviour log-probs: colored by T, sorted by the teacher's log-prob per token, lowest first
    mean_t = {r["sample_id"]: np.mean(np.float64(r["teacher_logp"])) for r in table.to_pylist()}
    with Chromium(find_chromium(), tmp_path / "profile") as br:
        br.open(out.as_uri(), ready="document.body.dataset.ready === '1'")
        assert br.eval("[document.getElementById('metric').value, document.getElementById('sort').value]") == [
            "logp", "logp"]
        assert br.eval("[...document.querySelectorAll('.sample')].map(e => e.dataset.sampleId)") == sorted(
            mean_t, key=mean_t.get)
        br.select("#reason", "kept")
        assert br.eval("[...document.querySelectorAll('.sample:not(.hidden)')].map(e => e.dataset.sampleId)") == \
            sorted((k for k, v in reward.items() if v >= 0.5), key=mean_t.get)


def test_cli_errors_are_one_line(view, tmp_path):
    layout, _, _ = view
    res = CliRunner().invoke(app, ["inspect", layout.root, "--iteration", "5", "--html", str(tmp_path / "x.html")])
    assert res.exit_code == 2 and "not done" in res.output and not (tmp_path / "x.html").exists()


def test_flat_topk_rows_and_script_safe_embedding():
    from opd_tasks.inspect_html import _topk, render_html

    t = pa.table({"teacher_topk_ids.a": pa.array([[1, 2, 3, 4], None], pa.list_(pa.int32())),
                  "teacher_topk_logp.a": pa.array([[-0.1, -2.0, -0.5, -0.7], None], pa.list_(pa.float32()))})
    got = _topk(t, "a", [2, 0])  # row 0: 2 tokens x K=2, flat
    assert got[1] is None and [g[0] for g in got[0]] == [[1, 2], [3, 4]]
    assert [g[1] for g in got[0]] == [pytest.approx([-0.1, -2.0]), pytest.approx([-0.5, -0.7])]
    assert _topk(t, "b", [2]) is None
    evil = "</script><script>alert(1)</script>"
    page = render_html({"summary": {"stage_dir": evil, "iteration": 0}, "vocab": {"1": evil}, "samples": []})
    assert page.count("</script>") == PAGE.count("</script>") and "&lt;/script&gt;" in page  # title escaped
