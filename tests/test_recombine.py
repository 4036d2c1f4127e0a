"""`opd recombine`: a new scored stage from the stored teacher_logp.NAME columns, checked against the
float64 mixture / product of those columns; every other column copied; resumable; bad weights refused."""
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from opd_tasks.errors import OpdError
from opd_tasks.inspect import inspect_report
from opd_tasks.recombine import parse_weights, recombine_stage
from storage.layout import RunLayout
from storage.manifest import read_manifest
from storage.shards import read_provenance, read_stage

_spec = importlib.util.spec_from_file_location("storage_factories", Path(__file__).parent / "storage" / "factories.py")
F = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(F)


@pytest.fixture()
def run(tmp_path):
    return F.make_run(str(tmp_path / "run"), iterations=1, partial_last=False, n_prompts=4, group_size=3)


def _cols(table, name):
    return [np.asarray(x, np.float64) for x in table.column(name).to_pylist()]


def test_recombine_is_the_float64_mixture_of_the_stored_columns(run, tmp_path):
    src = read_stage(run.fs, run.stage_dir(0, "scored"))
    out = str(tmp_path / "mix")
    res = CliRunner().invoke(app, ["recombine", run.root, "--iteration", "0", "--weights", "math=0.3,code=0.7",
                                   "--mode", "mixture", "--output", out])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["rows"] == 12
    new = read_stage(run.fs, out)
    for got, a, b in zip(_cols(new, "teacher_logp"), _cols(src, "teacher_logp.math"), _cols(src, "teacher_logp.code")):
        want = np.logaddexp(np.log(0.3) + a, np.log(0.7) + b)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.concatenate(_cols(new, "teacher_logp")), np.concatenate(_cols(src, "teacher_logp")))
    keep = [c for c in src.column_names if c != "teacher_logp"]
    assert new.select(keep).equals(src.select(keep))  # everything else copied as is
    prov = read_provenance(run.fs, out)
    assert [(t["name"], t["weight"]) for t in prov["teachers"]] == [("math", 0.3), ("code", 0.7)]
    assert prov["recombined_from"]["stage"] == run.stage_dir(0, "scored")
    assert inspect_report(out)["combined"]["mode"] == "mixture"  # the output is a stage like `opd score`'s


def test_product_and_route_and_resume(run, tmp_path):
    src = read_stage(run.fs, run.stage_dir(0, "scored"))
    out = str(tmp_path / "prod")
    res = recombine_stage(run.root, out, iteration=0, weights={"math": 0.5, "code": 2.0}, mode="product")
    assert res["parts"] == 3 and not res["skipped"]
    for got, a, b in zip(_cols(read_stage(run.fs, out), "teacher_logp"), _cols(src, "teacher_logp.math"),
                         _cols(src, "teacher_logp.code")):
        np.testing.assert_allclose(got, 0.5 * a + 2.0 * b, rtol=1e-6, atol=1e-6)
    # interrupted after part 1: the manifest and part 2 are gone; resume writes only part 2
    os.remove(os.path.join(out, "_MANIFEST.json"))
    os.remove(os.path.join(out, "part-00002.parquet"))
    kept = os.stat(os.path.join(out, "part-00000.parquet")).st_mtime_ns
    assert recombine_stage(run.root, out, iteration=0, weights={"math": 0.5, "code": 2.0}, mode="product")["rows"] == 12
    assert os.stat(os.path.join(out, "part-00000.parquet")).st_mtime_ns == kept
    assert recombine_stage(run.root, out, iteration=0, weights={"math": 0.5, "code": 2.0}, mode="product")["skipped"]
    with pytest.raises(OpdError, match="holds another finished stage"):
        recombine_stage(run.root, out, iteration=0, weights={"math": 1.0, "code": 2.0}, mode="product")
    # route by the domains stored in the provenance: each sample takes its domain's teacher exactly
    lay = RunLayout(str(tmp_path / "routed-run"))
    table, prov = F.make_scored_table(n_prompts=4, group_size=3)
    for t, d in zip(prov["teachers"], ("math", "code")):
        t["domain"] = d
    F.write_stage(lay.fs, lay.stage_dir(0, "scored"), table, prov)
    routed = read_stage(lay.fs, recombine_stage(lay.root, str(tmp_path / "route"), mode="route")["output"])
    for row in routed.to_pylist():
        assert row["teacher_logp"] == row[f"teacher_logp.{row['domain']}"]


def test_bad_weights_are_refused_by_name(run, tmp_path):
    runner = CliRunner()
    for weights, msg in (("math=0.3", r"stage's teachers are \['math', 'code'\]"), ("math=x,code=1", "'math=x'"),
                         ("math=-1,code=1", "'math=-1'"), ("math=1,math=2", "given twice")):
        res = runner.invoke(app, ["recombine", run.root, "--weights", weights, "--output", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert re.search(msg, res.output), res.output
    assert read_manifest(run.fs, str(tmp_path / "o")) is None
    res = runner.invoke(app, ["recombine", run.root, "--mode", "average", "--output", str(tmp_path / "o")])
    assert res.exit_code == 2 and "not one of" in res.output
    assert parse_weights("a=0.25, b=1") == {"a": 0.25, "b": 1.0}
