"""Crash-resume matrix: a real SIGKILL at each fault point, then resume; the result must be the
uninterrupted run's, bit for bit.

    .venv/bin/python -m pytest -q tests/reliability/test_crash_resume.py

World: the tiny random world of tests/tiny_world.py (not the toy world: seconds instead of minutes;
this tests the pipes, not learning), 2 iterations, fixed seeds, one torch thread in every process.

One uninterrupted reference run, then ONE chain of runs on a second run directory: each run of the
chain is killed (OPD_FAULT=point[:n] -> storage.faults SIGKILLs the `opd` process) at the next
point of the matrix and is itself the resume of the previous kill; a last plain `opd resume`
finishes. 7 CLI runs instead of 11 (kill + resume per point, each paying Prefect and torch start-up);
every kill still lands in a run that is resuming the previous one, and after each kill the test
checks that the kill happened where it should (stage states), that no committed part was redone
and that no partial stage holds a duplicate or foreign row. Fault counters are per process, so
the points are spread over both iterations: the rollout and scoring kills in iteration 0, the
training, manifest and evaluation kills in iteration 1 (training resumed from a DCP checkpoint).

At the end: every stage and checkpoint done, every manifest verifies (sizes + sha256) and lists
every file of its directory (no stray file, no temporary), rollout/scored tables equal the
reference's (same rows, no duplicate, none missing), train and eval metrics and metrics.jsonl equal
the reference's except timings and paths, and both checkpoints' hf/model.safetensors and DCP data
files (model + optimizer state + RNG) are bitwise equal (CPU, same thread count: no tolerance).

A second test covers a crash window the fault points do not reach: after the last eval manifest,
before the iteration's metrics.jsonl line; a resume writes the missing line.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest

from storage.checkpoints import checkpoint_status
from storage.layout import RunLayout
from storage.manifest import read_manifest, stage_status, stray_files
from storage.shards import finished_parts, read_part, read_stage
from tiny_world import tiny_config, write_config

pytestmark = [pytest.mark.slow, pytest.mark.prefect_server]

STAGES = ("rollout", "scored", "train", "eval")
ITERATIONS = 2
D, P, M = "done", "partial", "missing"
ALL_DONE = (D, D, D, D, D)
NOTHING = (M, M, M, M, M)

# fault point -> what the run directory looks like right after the kill:
# {iteration: (rollout, scored, train, eval, checkpoint)}. Counters count within one process.
MATRIX = [
    # killed during rollout: 2 of its 3 parts committed
    ("rollout.part:2", {0: (P, M, M, M, M), 1: NOTHING}),
    # between two scoring parts (rollout resumed first: only its missing part written)
    ("scored.part:2", {0: (D, P, M, M, M), 1: NOTHING}),
    # during training, after an optimizer step (iteration 1's first: global step 3), before the
    # checkpoint is written or committed
    ("train.step:3", {0: ALL_DONE, 1: (D, D, M, M, M)}),
    # during a manifest write: the 2nd manifest of this process is iteration 1's train manifest
    # (after its checkpoint manifest): checkpoint complete, train stage not
    ("manifest:2", {0: ALL_DONE, 1: (D, D, P, M, D)}),
    # during evaluation, before the eval manifest
    ("eval:1", {0: ALL_DONE, 1: (D, D, D, M, D)}),
]


def _states(run: Path) -> dict[int, tuple]:
    lay = RunLayout(str(run))
    return {n: tuple(stage_status(lay.fs, lay.stage_dir(n, s)) for s in STAGES) + (checkpoint_status(lay, n),)
            for n in range(ITERATIONS)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_ids(run: Path) -> dict[tuple[int, str], list[str]]:
    """sample_id column of every done rollout/scored stage, in row order."""
    lay = RunLayout(str(run))
    return {(n, s): read_stage(lay.fs, lay.stage_dir(n, s), columns=["sample_id"]).column(0).to_pylist()
            for n in range(ITERATIONS) for s in ("rollout", "scored")
            if stage_status(lay.fs, lay.stage_dir(n, s)) == D}


def _committed_parts(run: Path) -> dict[str, int]:
    """mtime of every committed part of the rollout/scored stages (to see that none is redone)."""
    out = {}
    for n in range(ITERATIONS):
        for s in ("rollout", "scored"):
            for p in sorted((run / f"iter-{n:06d}" / s).glob("part-*.parquet")):
                out[str(p.relative_to(run))] = p.stat().st_mtime_ns
    return out


def _check_rows(run: Path, ref_ids: dict) -> None:
    """Done stages hold exactly the reference's rows; a partial stage's committed parts hold a
    duplicate-free subset of them (nothing foreign, nothing twice)."""
    lay = RunLayout(str(run))
    for (n, s), ids in _sample_ids(run).items():
        assert ids == ref_ids[(n, s)], f"iteration {n} {s}: rows differ from the uninterrupted run"
    for n in range(ITERATIONS):
        for s in ("rollout", "scored"):
            d = lay.stage_dir(n, s)
            if stage_status(lay.fs, d) != P:
                continue
            ids = [i for p in finished_parts(lay.fs, d).values()
                   for i in read_part(lay.fs, d, p, columns=["sample_id"]).column(0).to_pylist()]
            assert ids and len(ids) == len(set(ids)), f"iteration {n} {s}: duplicate rows in committed parts"
            assert set(ids) < set(ref_ids[(n, s)]), f"iteration {n} {s}: rows the reference run does not have"


def _dirs(run: Path) -> list[str]:
    lay = RunLayout(str(run))
    return [lay.stage_dir(n, s) for n in range(ITERATIONS) for s in STAGES] + \
           [lay.checkpoint_dir(n) for n in range(ITERATIONS)]


def _without(obj, drop: tuple[str, ...]):
    """obj without the keys in `drop` (timings and paths) at any depth."""
    if isinstance(obj, dict):
        return {k: _without(v, drop) for k, v in obj.items() if k not in drop}
    if isinstance(obj, list):
        return [_without(v, drop) for v in obj]
    return obj


TIMINGS_AND_PATHS = ("seconds", "tokens_per_s", "tokens_per_s_after_first_step", "old_logp_seconds", "checkpoint")


def _metrics(run: Path) -> dict:
    out = {"metrics.jsonl": [_without(json.loads(x), TIMINGS_AND_PATHS)
                             for x in (run / "metrics.jsonl").read_text().splitlines()]}
    for n in range(ITERATIONS):
        for s in ("train", "eval"):
            out[f"{n}/{s}"] = _without(json.loads((run / f"iter-{n:06d}" / s / "metrics.json").read_text()),
                                       TIMINGS_AND_PATHS)
    return out


def _weights(run: Path) -> dict[str, str]:
    """sha256 of each checkpoint's HF weights and DCP data files (model, optimizer state, step, RNG
    states; DCP's .metadata is left out: it differs between identical saves)."""
    ckpts = [run / "checkpoints" / f"iter-{n:06d}" for n in range(ITERATIONS)]
    files = [p for c in ckpts for p in (*c.glob("hf/*.safetensors"), *c.glob("dcp/*.distcp"))]
    return {str(p.relative_to(run)): _sha(p) for p in sorted(files)}


def _assert_same_result(run: Path, ref: Path, ref_ids: dict) -> None:
    """A finished run equals the uninterrupted reference: rows, values, manifests, metrics, weights."""
    # rows: every stage has the reference's rows, once each, in the same parts
    lay, ref_lay = RunLayout(str(run)), RunLayout(str(ref))
    assert _sample_ids(run) == ref_ids
    for n in range(ITERATIONS):
        for s in ("rollout", "scored"):
            got = read_stage(lay.fs, lay.stage_dir(n, s)).replace_schema_metadata(None)
            want = read_stage(ref_lay.fs, ref_lay.stage_dir(n, s)).replace_schema_metadata(None)
            assert got.equals(want), f"iteration {n} {s}: values differ from the uninterrupted run"
    # manifests: each verifies (every listed file there, sizes and sha256) and lists every file
    for d in _dirs(run):
        assert read_manifest(lay.fs, d, verify=True) is not None, d
        assert stray_files(lay.fs, d) == [], d
    # the outcome: metrics (minus timings and paths) and weights, bitwise
    assert _metrics(run) == _metrics(ref)
    weights = _weights(ref)
    assert len(weights) == 2 * ITERATIONS and _weights(run) == weights


@pytest.fixture(scope="module")
def config(tiny_world, tmp_path_factory) -> str:
    return write_config(tmp_path_factory.mktemp("cfg") / "cfg.yaml", tiny_config(tiny_world, iterations=ITERATIONS))


@pytest.fixture(scope="module")
def reference(config, opd_cli, tmp_path_factory) -> Path:
    """The uninterrupted run (read only)."""
    ref = tmp_path_factory.mktemp("reference") / "run"
    done = opd_cli("run", config, "--run-dir", str(ref))
    assert done.returncode == 0, done.stdout[-4000:]
    assert _states(ref) == {n: ALL_DONE for n in range(ITERATIONS)}
    return ref


def test_kill_at_every_fault_point_then_resume_gives_the_uninterrupted_result(tmp_path, config, reference, opd_cli):
    cfg, ref, run = config, reference, tmp_path / "run"
    ref_ids = _sample_ids(ref)
    assert all(len(v) == len(set(v)) == 12 for v in ref_ids.values())  # 6 prompts x 2 samples

    committed: dict[str, int] = {}
    for k, (fault, expected) in enumerate(MATRIX):
        args = ["run", cfg, "--run-dir", str(run)] if k == 0 else ["resume", str(run)]
        killed = opd_cli(*args, OPD_FAULT=fault)
        assert killed.returncode == -9, f"{fault}: not killed (rc {killed.returncode})\n{killed.stdout[-4000:]}"
        assert _states(run) == expected, fault
        now = _committed_parts(run)
        assert {p: now.get(p) for p in committed} == committed, f"{fault}: a committed part was rewritten"
        committed = now
        _check_rows(run, ref_ids)
        for d in _dirs(run):  # a killed write may leave a temporary (hidden, never read), nothing else
            assert all(os.path.basename(f).startswith(".") and f.endswith(".tmp") for f in stray_files(
                RunLayout(str(run)).fs, d)), d
        if fault == "train.step:3":  # killed right after global step 3 (iteration 1's first), not before
            assert '"step": 3' in killed.stdout and '"step": 4' not in killed.stdout

    finished = opd_cli("resume", str(run))
    assert finished.returncode == 0, finished.stdout[-4000:]
    assert _states(run) == {n: ALL_DONE for n in range(ITERATIONS)}
    assert {p: _committed_parts(run).get(p) for p in committed} == committed

    _assert_same_result(run, ref, ref_ids)


def test_a_kill_after_the_last_eval_manifest_but_before_the_metrics_line_is_healed_on_resume(tmp_path, reference,
                                                                                             opd_cli):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(lines[:-1]))  # what that kill leaves (no fault point there)
    res = opd_cli("resume", str(run))
    assert res.returncode == 0, res.stdout[-4000:]
    assert _metrics(run)["metrics.jsonl"] == _metrics(reference)["metrics.jsonl"]


def test_a_streamed_run_killed_while_rollout_and_scoring_run_at_once_resumes_to_the_sequential_result(
        tmp_path, tiny_world, reference, opd_cli):
    """scoring.streaming: on (hf engines here; not in the config hash): killed after the 2nd rollout part
    (scoring beside it), then the resume (streaming the last rollout part) after its 1st scored part;
    the finished run is the sequential reference's, bit for bit."""
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tiny_world, iterations=ITERATIONS, scoring={"streaming": "on"}))
    run, ref_ids, committed = tmp_path / "run", _sample_ids(reference), {}
    for k, (fault, scored) in enumerate((("rollout.part:2", (M, P)), ("scored.part:1", (P,)))):
        args = ["run", cfg, "--run-dir", str(run)] if k == 0 else ["resume", str(run)]
        killed = opd_cli(*args, OPD_FAULT=fault)
        assert killed.returncode == -9, f"{fault}: not killed (rc {killed.returncode})\n{killed.stdout[-4000:]}"
        states = _states(run)
        assert states[0][0] in (P, D) and states[0][1] in scored and states[0][2:] == (M, M, M), (fault, states)
        assert states[1] == NOTHING
        now = _committed_parts(run)
        assert {p: now.get(p) for p in committed} == committed, f"{fault}: a committed part was rewritten"
        committed = now
        _check_rows(run, ref_ids)
    finished = opd_cli("resume", str(run))
    assert finished.returncode == 0, finished.stdout[-4000:]
    assert {p: _committed_parts(run).get(p) for p in committed} == committed
    _assert_same_result(run, reference, ref_ids)
