"""A run with an offline phase (teacher-generated data, sft warm start) and one on-policy iteration,
through the `opd` CLI and Prefect: completes; killed (SIGKILL) during the offline training and
resumed, it ends with exactly the uninterrupted run's weights (CPU, one thread: bitwise).

    .venv/bin/python -m pytest -q tests/offline/test_offline_run.py
"""
import json
from pathlib import Path

import pytest

from opd_tasks.inspect import inspect_report
from opd_tasks.status import status_report
from storage.layout import RunLayout
from storage.manifest import read_manifest, stage_status
from storage.shards import read_stage
from tiny_world import tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]


def offline_config(world) -> dict:
    return tiny_config(world, iterations=1,
                       teachers=[{"name": "tx", "path": world["tx"], "domain": "x"},
                                 {"name": "ty", "path": world["ty"], "domain": "y"}],
                       combination="route",
                       offline={"generate": {"model": "route", "prompts": 8, "group_size": 2, "max_new_tokens": 5},
                                "epochs": 2, "mini_batches": 2, "lr": 3e-3,
                                "filter": {"min_teacher_logp_per_token": -3.72}})


def _offline_states(run: Path) -> dict:
    lay = RunLayout(str(run))
    out = {s: stage_status(lay.fs, lay.offline_dir(s)) for s in ("rollout", "scored", "filter", "train", "evaluation")}
    out["checkpoint"] = stage_status(lay.fs, lay.offline_checkpoint_dir())
    return out


def _bytes(run: Path, rel: str) -> bytes:
    return (run / rel).read_bytes()


def test_offline_phase_then_on_policy_completes_and_resumes_after_a_kill_during_offline_training(
        tmp_path, tiny_world, opd_cli):
    cfg = write_config(tmp_path / "cfg.yaml", offline_config(tiny_world))
    ref, run = tmp_path / "ref", tmp_path / "run"

    done = opd_cli("run", cfg, "--run-dir", str(ref))
    assert done.returncode == 0, done.stdout[-3000:]
    assert set(_offline_states(ref).values()) == {"done"}
    status = status_report(str(ref))
    assert [set(i["stages"].values()) for i in status["iterations"]] == [{"done"}]
    assert status["offline"]["checkpoint"] == "done"
    lay = RunLayout(str(ref))
    # iteration 0 sampled from, and trained on top of, the warm start (G-OPD reference included)
    rollout0 = read_manifest(lay.fs, lay.stage_dir(0, "rollout"))
    assert rollout0.inputs["student"] == str(ref / "checkpoints" / "offline" / "hf")
    assert read_manifest(lay.fs, lay.stage_dir(0, "scored")).inputs["reference"] == rollout0.inputs["student"]
    train0 = json.loads((ref / "iter-000000" / "train" / "metrics.json").read_text())
    assert train0["loss_kind"] == "gopd"
    offline_train = json.loads((ref / "offline" / "train" / "metrics.json").read_text())
    filt = read_manifest(lay.fs, lay.offline_dir("filter")).extra
    assert offline_train["loss_kind"] == "sft" and offline_train["rows"] == filt["kept"]
    assert 0 < filt["kept"] < filt["rows"] == 16  # the threshold keeps some rows and drops others
    assert [s["step"] for s in offline_train["steps"]] == [1, 2, 3, 4]
    accuracy = json.loads((ref / "offline" / "evaluation" / "metrics.json").read_text())
    assert set(accuracy["accuracy"]) == {"x", "y"}

    killed = opd_cli("run", cfg, "--run-dir", str(run), OPD_FAULT="train.step:2")
    assert killed.returncode == -9, killed.stdout[-3000:]
    states = _offline_states(run)
    assert (states["rollout"], states["scored"], states["filter"]) == ("done", "done", "done")
    assert states["train"] != "done" and states["checkpoint"] != "done"
    assert not (run / "iter-000000").exists()

    resumed = opd_cli("resume", str(run))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert set(_offline_states(run).values()) == {"done"}
    for rel in ("checkpoints/offline/hf/model.safetensors", "checkpoints/iter-000000/hf/model.safetensors"):
        assert _bytes(run, rel) == _bytes(ref, rel), rel
    a, b = RunLayout(str(ref)), RunLayout(str(run))
    assert read_stage(a.fs, a.offline_dir("scored")).equals(read_stage(b.fs, b.offline_dir("scored")))
    again = json.loads((run / "offline" / "train" / "metrics.json").read_text())
    assert [s["loss"] for s in again["steps"]] == [s["loss"] for s in offline_train["steps"]]

    report = inspect_report(str(run), offline=True)
    assert report["filter"]["kept"] == filt["kept"] and report["filter"]["reasons"] == filt["reasons"]
