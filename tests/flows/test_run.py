"""A whole run through the `opd` CLI and Prefect: killed during scoring (a real SIGKILL), resumed,
nothing finished redone. Plus the config-identity rules of prepare_run."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.errors import OpdError
from tiny_world import tiny_config, write_config

OPD = [sys.executable, "-m", "flows.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _opd(args, tmp_path, **env):
    """Run the CLI in its own session; afterwards kill the session's leftovers (a SIGKILLed opd
    leaves Prefect's temporary API server running, and it would hold our pipes open)."""
    e = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
         **env}
    e.pop("PREFECT_API_URL", None)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(out, "w") as o, open(err, "w") as r:
        p = subprocess.Popen(OPD + args, cwd=ROOT, env=e, stdout=o, stderr=r, start_new_session=True)
        try:
            p.wait(timeout=600)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(p.args, p.returncode, out.read_text(), err.read_text())


def _mtimes(d: Path) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in sorted(d.glob("*.parquet"))}


@pytest.mark.slow
def test_run_killed_during_scoring_resumes_without_redoing_work(tmp_path, tiny_world):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tiny_world, iterations=2))
    run = tmp_path / "run"
    killed = _opd(["run", cfg, "--run-dir", str(run)], tmp_path, OPD_FAULT="scored.part:2")
    assert killed.returncode == -9, killed.stdout[-2000:] + killed.stderr[-2000:]
    status = json.loads(_opd(["status", str(run), "--json"], tmp_path).stdout)
    assert status["iterations"][0]["stages"] == {"rollout": "done", "scored": "partial", "train": "missing",
                                                 "eval": "missing"}
    rollout0, scored0 = _mtimes(run / "iter-000000" / "rollout"), _mtimes(run / "iter-000000" / "scored")
    assert list(scored0) == ["part-00000.parquet", "part-00001.parquet"]

    done = _opd(["resume", str(run)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _mtimes(run / "iter-000000" / "rollout") == rollout0            # rollout not redone
    after = _mtimes(run / "iter-000000" / "scored")
    assert {k: after[k] for k in scored0} == scored0 and len(after) == 3   # only the missing part scored
    status = json.loads(_opd(["status", str(run), "--json"], tmp_path).stdout)
    for it in status["iterations"]:
        assert set(it["stages"].values()) == {"done"}, it
    assert status["latest_checkpoint"] is not None
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [0, 1]
    assert all(x["accuracy"] is not None and x["loss"] is not None for x in lines)


def test_a_changed_config_is_refused_but_iterations_may_change(tmp_path, tiny_world):
    run = str(tmp_path / "run")
    prepare_run(parse_config(tiny_config(tiny_world, iterations=1)), run)
    prepare_run(parse_config(tiny_config(tiny_world, iterations=5)), run)  # allowed
    with pytest.raises(OpdError, match=r"loss\.lam.*1\.25 -> 1\.5"):
        prepare_run(parse_config(tiny_config(tiny_world, loss={"kind": "gopd", "lambda": 1.5})), run)
