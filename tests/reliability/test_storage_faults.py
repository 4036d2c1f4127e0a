"""Storage faults, met in one process on opdfault:// (memory:// behind storage/faults.py's
FaultFileSystem, which fails a chosen fraction of calls): a flaky store, failing reads on a
finished run, a full disk. Iteration 0's rollout -> score -> train of the tiny world (models load
from local directories; the checkpoint and every stage live on the faulty store).

    .venv/bin/python -m pytest -q tests/reliability/test_storage_faults.py

Each run either finishes equal to a clean run or stops with a one-line error naming the path;
`resume` (the same stages, faults off) then finishes equal to the clean run: rollout/scored tables,
train metrics (less timings and paths) and the checkpoint's weights and DCP state, bit for bit.
A storage error is never taken for "missing": reads that fail on a finished run redo, rewrite or
delete nothing (the train stage clears its checkpoint dir before saving: it must not run).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid

import pytest

from opd_tasks.config import parse_config
from opd_tasks.context import prepare_run
from opd_tasks.errors import OpdError
from opd_tasks.rollout import run_rollout
from opd_tasks.scoring import run_scoring
from opd_tasks.trainer.stage import run_training
from storage import fs as sfs
from storage.checkpoints import is_complete
from storage.errors import StorageError, StorageFullError
from storage.faults import FaultPlan, inject
from storage.layout import RunLayout
from storage.manifest import read_manifest, stage_files
from storage.shards import read_stage
from tiny_world import tiny_config
from train.train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

STAGES = (run_rollout, run_scoring, run_training)
TIMINGS_AND_PATHS = ("seconds", "tokens_per_s", "tokens_per_s_after_first_step", "old_logp_seconds", "checkpoint")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Every run of this module (the module-scoped clean one too) on one torch thread: the clean and
    the resumed runs are compared bit for bit, and with 2 intra-op threads the trainer's float32
    reductions were seen to differ between two runs in one process (1e-8, CPU kernels' split)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(sfs, "IO_BACKOFF_S", 0.0)


@pytest.fixture(scope="module")
def cfg(tiny_world) -> dict:
    return tiny_config(tiny_world)


def _new_run() -> str:
    return f"opdfault:///opd-faults-{uuid.uuid4().hex[:10]}/run"


def _pipeline(run: str, cfg: dict) -> None:
    """What `opd run` / `opd resume` does for iteration 0, less Prefect."""
    ctx = prepare_run(parse_config(cfg), run)
    for stage in STAGES:
        stage(ctx, 0)


def _without(obj):
    if isinstance(obj, dict):
        return {k: _without(v) for k, v in obj.items() if k not in TIMINGS_AND_PATHS}
    if isinstance(obj, list):
        return [_without(v) for v in obj]
    return obj


def _outcome(run: str) -> dict:
    """Tables, train metrics and the checkpoint's data files (DCP's .metadata differs between identical saves)."""
    lay = RunLayout(run)
    out = {s: read_stage(lay.fs, lay.stage_dir(0, s)).replace_schema_metadata(None) for s in ("rollout", "scored")}
    out["train"] = _without(json.loads(lay.fs.cat_file(lay.join("iter-000000", "train", "metrics.json"))))
    ckpt = lay.checkpoint_dir(0)
    out["weights"] = {f: hashlib.sha256(lay.fs.cat_file(f"{ckpt}/{f}")).hexdigest() for f in stage_files(lay.fs, ckpt)
                      if f.endswith((".safetensors", ".distcp"))}
    assert any(f.endswith(".distcp") for f in out["weights"]) and "hf/model.safetensors" in out["weights"]
    return out


def _committed(run: str) -> dict[str, str]:
    """sha256 of every file of every stage / checkpoint that has a manifest."""
    lay = RunLayout(run)
    dirs = [lay.stage_dir(0, s) for s in ("rollout", "scored", "train")] + [lay.checkpoint_dir(0)]
    return {f"{d}/{f}": hashlib.sha256(lay.fs.cat_file(f"{d}/{f}")).hexdigest()
            for d in dirs if read_manifest(lay.fs, d) is not None for f in stage_files(lay.fs, d)}


@pytest.fixture(scope="module")
def clean(cfg) -> dict:
    """The clean run's outcome and how many writes it made."""
    run = _new_run()
    with inject(FaultPlan()) as plan:
        _pipeline(run, cfg)
    return {"outcome": _outcome(run), "writes": plan.seen["write"], "run": run}


def _one_line_naming_the_path(err: BaseException) -> str:
    msg = str(err)
    assert "\n" not in msg and "/opd-faults-" in msg, msg
    return msg


@pytest.mark.parametrize("plan", [
    dict(rate=0.3, ops={"read", "list"}, error="denied", seed=1),   # throttling / transient 403s on reads
    dict(rate=0.05, error="eio", seed=2),                           # any call, reads, writes and deletes
], ids=["flaky-reads", "flaky-everything"])
def test_a_flaky_store_finishes_as_clean_or_stops_clearly_then_resumes_to_the_clean_result(plan, cfg, clean):
    run = _new_run()
    with inject(FaultPlan(**plan)) as faults:
        try:
            _pipeline(run, cfg)
            stopped = None
        except (OpdError, OSError) as err:
            stopped = _one_line_naming_the_path(err)
    assert sum(faults.failures.values()) > 0  # faults were injected (and absorbed, or reported)
    committed = _committed(run)
    _pipeline(run, cfg)  # `opd resume`, the store healthy again
    assert _outcome(run) == clean["outcome"], stopped
    now = _committed(run)
    assert {k: now.get(k) for k in committed} == committed  # what was committed stayed as it was


def test_failing_reads_on_a_finished_run_redo_rewrite_and_delete_nothing(cfg, clean):
    run = clean["run"]
    before = _committed(run)
    with inject(FaultPlan()) as healthy:
        _pipeline(run, cfg)  # a resume of a finished run only reads
    assert healthy.seen["write"] == healthy.seen["delete"] == 0 and healthy.seen["read"] > 0
    for seed in range(3):  # half of all reads fail: most retries succeed, some calls exhaust theirs
        with inject(FaultPlan(rate=0.5, ops={"read", "list"}, error="denied", seed=seed)) as flaky:
            try:
                _pipeline(run, cfg)
            except StorageError as err:
                _one_line_naming_the_path(err)
        assert flaky.failures["read"] > 0 and flaky.seen["write"] == flaky.seen["delete"] == 0, seed
    with inject(FaultPlan(rate=1.0, ops={"read", "list"}, error="denied")) as down:
        with pytest.raises(StorageError, match=r"^opdfault:///opd-faults-\w+/run/run\.yaml: checking whether it "
                                               r"exists failed 5 times \(PermissionError: .*Access Denied"):
            _pipeline(run, cfg)
    assert down.seen["write"] == down.seen["delete"] == 0
    assert _committed(run) == before and is_complete(RunLayout(run), 0)


@pytest.mark.parametrize("at", [0.3, 0.9], ids=["during-scoring", "during-the-checkpoint-save"])
def test_a_full_disk_stops_in_one_line_leaves_nothing_half_and_resumes_to_the_same_weights(at, cfg, clean):
    run = _new_run()
    with inject(FaultPlan(rate=1.0, ops={"write"}, error="enospc", after=int(at * clean["writes"]))):
        with pytest.raises(StorageFullError) as err:
            _pipeline(run, cfg)
    msg = _one_line_naming_the_path(err.value)
    assert "no space left" in msg and "free space where it is written" in msg and "opd resume" in msg
    lay = RunLayout(run)
    assert not is_complete(lay, 0) and read_manifest(lay.fs, lay.stage_dir(0, "train")) is None
    for s in ("rollout", "scored"):  # a stage is done (and verifies) or not done: never half
        d = lay.stage_dir(0, s)
        assert read_manifest(lay.fs, d) is None or read_manifest(lay.fs, d, verify=True) is not None
    _pipeline(run, cfg)  # space is back
    assert _outcome(run) == clean["outcome"]


def test_a_full_local_disk_leaves_no_temporary_and_names_the_path(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    fs, path = sfs.filesystem(str(tmp_path / "stage"))
    with pytest.raises(StorageFullError, match=rf"^{tmp_path}/stage/_MANIFEST\.json: no space left \(writing 3 bytes\);"
                                               rf" free space where it is written \(df -h {tmp_path}/stage;"):
        sfs.write_bytes_atomic(fs, f"{path}/_MANIFEST.json", b"{}\n")
    assert os.listdir(tmp_path / "stage") == []


def test_exists_is_true_false_or_an_error(monkeypatch):
    fs, path = sfs.filesystem(_new_run())
    sfs.write_bytes_atomic(fs, f"{path}/a", b"x")
    with inject(FaultPlan(rate=1.0, ops={"read"}, error="timeout", limit=4)):
        assert sfs.exists(fs, f"{path}/a") and not sfs.exists(fs, f"{path}/b")  # 4 failures, then answered
    with inject(FaultPlan(rate=1.0, ops={"read"}, error="eio")):
        with pytest.raises(StorageError, match=r"/a: checking whether it exists failed 5 times \(OSError: \[Errno 5\]"):
            sfs.exists(fs, f"{path}/a")


def test_no_permission_on_a_local_directory_is_named_in_one_line(tmp_path, monkeypatch):
    def denied(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", dst)  # what a chmod 555 dir gives (not to root)
    monkeypatch.setattr(os, "replace", denied)
    fs, path = sfs.filesystem(str(tmp_path / "stage"))
    with pytest.raises(StorageFullError, match=rf"^{tmp_path}/stage/a\.json: permission denied \(writing 2 bytes\); "
                                               rf"make {tmp_path}/stage writable for this user"):
        sfs.write_bytes_atomic(fs, f"{path}/a.json", b"{}")
    assert os.listdir(tmp_path / "stage") == []
