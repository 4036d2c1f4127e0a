"""The README's DuckDB queries and `datasets` snippet ("Looking at a scored batch"), run as written
against a two-iteration run (with runs/demo replaced by its path), checked against numpy."""
import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest

from storage.layout import RunLayout

_spec = importlib.util.spec_from_file_location("storage_factories", Path(__file__).parent / "storage" / "factories.py")
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)
ROOT = Path(__file__).resolve().parents[1]


def _blocks(lang: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Looking at a scored batch", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{lang}\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    layout = RunLayout(str(tmp_path_factory.mktemp("sql") / "run"))
    tables = []
    for n in range(2):
        t, prov = F.make_scored_table(n_prompts=4, group_size=2, teachers=("adder", "reverser"),
                                      domains=("add", "rev"), iteration=n, seed=n)
        F.write_stage(layout.fs, layout.stage_dir(n, "scored"), t, prov)
        tables.append(t)
    return layout, [r for t in tables for r in t.to_pylist()]


def test_readme_duckdb_queries(run):
    import duckdb

    layout, rows = run
    kl_sql, worst_sql = (q.replace("runs/demo", layout.root) for q in _blocks("sql"))
    con = duckdb.connect()
    got = con.sql(kl_sql).fetchall()
    want = []
    for key in sorted({(r["iteration"], r["domain"]) for r in rows}):
        sel = [r for r in rows if (r["iteration"], r["domain"]) == key]
        b = np.concatenate([np.float64(r["behaviour_logp"]) for r in sel])
        kls = [np.mean(b - np.concatenate([np.float64(r[c]) for r in sel]))
               for c in ("teacher_logp", "teacher_logp.adder", "teacher_logp.reverser")]
        want.append((*key, b.size, *kls))
    assert [g[:3] for g in got] == [w[:3] for w in want]
    for g, w in zip(got, want):
        assert g[3:] == pytest.approx(w[3:], abs=1e-6)

    worst = con.sql(worst_sql).fetchall()
    toks = [(r["iteration"], r["sample_id"], p, r["response_ids"][p], np.float64(r["behaviour_logp"][p]),
             np.float64(r["teacher_logp"][p])) for r in rows for p in range(len(r["response_ids"]))]
    toks.sort(key=lambda x: (-abs(x[4] - x[5]), x[0], x[1], x[2]))
    assert [w[:4] for w in worst] == [t[:4] for t in toks[:10]]
    assert [w[6] for w in worst] == pytest.approx([t[4] - t[5] for t in toks[:10]], abs=1e-6)


def test_readme_datasets_snippet(run, tmp_path, monkeypatch):
    import datasets

    layout, rows = run
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    (code,) = _blocks("python")
    ns: dict = {}
    exec(code.replace("runs/demo", layout.root).replace("iter-000003", "iter-000001"), ns)
    mine = [r for r in rows if r["iteration"] == 1]
    for ds in (ns["ds"], ns["exact"]):
        assert ds.num_rows == len(mine) and "teacher_logp.adder" in ds.column_names
        assert sorted(ds["sample_id"]) == sorted(r["sample_id"] for r in mine)
    assert ns["exact"]["response_ids"] == [r["response_ids"] for r in mine]
    assert any((tmp_path / "hf-cache").iterdir())  # load_dataset's copy went to tmp, not ~/.cache
