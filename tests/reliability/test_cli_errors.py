"""What a person sees when `opd` stops on a user error (subprocesses of the CLI, on the session's
shared Prefect server): one `error:` line and where the full log is, exit code 2, no traceback or
Prefect ERROR record on the console (they are in the log); `opd --debug` shows the traceback. A
run directory held by another opd is refused naming the holder.

    .venv/bin/python -m pytest -q tests/reliability/test_cli_errors.py
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from storage.layout import RunLayout
from storage.lock import acquire_lease
from tiny_world import tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def _lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.strip()]


def _log_of(lines: list[str]) -> Path:
    (line,) = [x for x in lines if x.startswith("full log: ")]
    return Path(line.removeprefix("full log: "))


def test_a_user_error_inside_a_run_prints_one_line_and_the_log_path(tmp_path, tiny_world, opd_cli):
    cfg = tiny_config(tiny_world)
    cfg["student"]["path"] = str(tmp_path / "models" / "student")  # fails inside the rollout task
    res = opd_cli("run", write_config(tmp_path / "cfg.yaml", cfg), "--run-dir", str(tmp_path / "run"),
                  OPD_LOG_DIR=str(tmp_path / "logs"))
    assert res.returncode == 2, res.stdout[-3000:]
    lines = _lines(res.stdout)
    assert [x for x in lines if x.startswith("error: ")] == [
        f"error: student path '{tmp_path}/models/student' does not exist; check the config's model paths "
        f"(student.path, teachers[].path, reference.path)"]
    assert not any(w in res.stdout for w in ("Traceback", "| ERROR", "Finished in state Failed")), res.stdout
    assert len(lines) <= 8, res.stdout  # Prefect's few INFO lines, the error, the log path (was ~50 lines)
    log = _log_of(lines).read_text()
    assert "Traceback" in log and "ModelPathError" in log  # the whole story is in the log


def test_a_run_held_by_another_opd_is_refused_naming_the_holder(tmp_path, tiny_world, opd_cli):
    run = tmp_path / "run"
    prepare_run(parse_config(tiny_config(tiny_world)), str(run))
    with acquire_lease(RunLayout(str(run)), flow_run="the-other-flow-run"):  # held by this (live) process
        res = opd_cli("resume", str(run), OPD_LOG_DIR=str(tmp_path / "logs"))
    assert res.returncode == 2, res.stdout[-3000:]
    (err,) = [x for x in _lines(res.stdout) if x.startswith("error: ")]
    assert f"another opd is writing this run: pid {os.getpid()} on host" in err
    assert "flow run the-other-flow-run" in err and f"`opd resume {run}` proceeds" in err
    assert "Traceback" not in res.stdout and not (run / "iter-000000").exists()


def test_debug_shows_the_traceback(tmp_path, tiny_world, opd_cli):
    bad = tiny_config(tiny_world)
    bad["teachers"][0]["weight"] = -0.7
    res = opd_cli("--debug", "run", write_config(tmp_path / "bad.yaml", bad), "--run-dir", str(tmp_path / "run"),
                  OPD_LOG_DIR=str(tmp_path / "logs"))
    assert res.returncode == 2, res.stdout[-3000:]
    assert "error: " in res.stdout and "weight must be finite and >= 0, got -0.7" in res.stdout
    assert "Traceback (most recent call last)" in res.stdout
