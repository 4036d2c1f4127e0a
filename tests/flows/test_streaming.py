"""Streaming scoring (opd_tasks.scoring.streams, rollout_and_score in flows/iteration.py): when it is
on, and that a streamed iteration writes the same rollout and scored shards and trains the same
weights as one stage after the other, bit for bit. The crash-resume of a streamed run is in
tests/reliability/test_crash_resume.py; the speed-up in benchmarks/bench_pipeline.py."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from opd_tasks.config import parse_config
from opd_tasks.scoring import streams
from tiny_world import tiny_config, write_config


def _cfg(world, **over):
    return parse_config(tiny_config(world, **over))


def test_streaming_only_when_every_scorer_runs_apart_from_the_rollout(tiny_world):
    # in-process hf engines share this process's device: one stage after the other
    assert not streams(_cfg(tiny_world))
    # remote teachers (servers elsewhere); rkl (lambda 1) reads no reference
    remote = {"engine": "remote"}
    teachers = [{"name": n, "path": tiny_world[n], "domain": d, "url": f"http://127.0.0.1:9/{n}/v1"}
                for n, d in (("tx", "x"), ("ty", "y"))]
    assert streams(_cfg(tiny_world, scoring=remote, teachers=teachers, loss={"kind": "gopd", "lambda": 1.0}))
    # ... but a reference scored by hf in this process, beside an hf rollout, is not apart
    assert not streams(_cfg(tiny_world, scoring={"engine": "hf"}, teachers=teachers))
    # vllm engine processes: apart on GPUs they do not share, not on a shared one or without GPUs
    vllm = dict(rollout={"engine": "vllm"}, scoring={"engine": "vllm"})
    apart = {"gpus": 2, "rollout": [0], "teachers": {"tx": [1], "ty": [1]}, "reference": [1]}
    assert streams(_cfg(tiny_world, **vllm, placement=apart))
    assert not streams(_cfg(tiny_world, **vllm, placement={**apart, "reference": [0]}))
    assert not streams(_cfg(tiny_world, **vllm, placement={"gpus": 1}))
    # forced either way; the field is not part of the run's identity (a resume may change it)
    on = _cfg(tiny_world, scoring={"streaming": "on"})
    off = _cfg(tiny_world, rollout={"engine": "vllm"}, scoring={"engine": "vllm", "streaming": "off"}, placement=apart)
    assert streams(on) and not streams(off)
    assert on.config_hash() == _cfg(tiny_world).config_hash()
    assert "streaming" not in _cfg(tiny_world).to_yaml()


def _files(run: Path) -> dict[str, str]:
    """sha256 of every rollout/scored part and every checkpoint weight file of the run."""
    files = [*run.glob("iter-*/rollout/part-*.parquet"), *run.glob("iter-*/scored/part-*.parquet"),
             *run.glob("checkpoints/iter-*/hf/*.safetensors"), *run.glob("checkpoints/iter-*/dcp/*.distcp")]
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(files)}


def _task_times(flow_run_id) -> dict[str, tuple]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, TaskRunFilter
    with get_client(sync_client=True) as client:
        subflows = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [f.id for f in subflows]}),
                                     task_run_filter=TaskRunFilter())
    return {r.name.rsplit("-", 1)[0]: (r.start_time, r.end_time) for r in runs}


@pytest.mark.slow
def test_streamed_iteration_writes_the_same_shards_and_weights(tmp_path, tiny_world, prefect_in_process, monkeypatch):
    """Streamed == sequential, bit for bit; and a streamed run whose rollout failed mid-stream,
    once resumed, too (one sequential reference for both)."""
    from flows.run import opd_run
    out = {}
    for mode in ("off", "on"):  # hf engines on the cpu: streaming forced on (auto keeps them sequential)
        cfg = write_config(tmp_path / f"{mode}.yaml", tiny_config(tiny_world, scoring={"streaming": mode}))
        state = opd_run(cfg, run_dir=str(tmp_path / mode), return_state=True)
        assert state.is_completed(), state
        out[mode] = _files(tmp_path / mode), _task_times(state.state_details.flow_run_id)
    (files_off, t_off), (files_on, t_on) = out["off"], out["on"]
    assert len([f for f in files_on if "/scored/" in f]) == 3 and any("safetensors" in f for f in files_on)
    assert files_on == files_off
    # sequential: scoring starts after the rollout ended; streaming: it starts while the rollout runs
    assert t_off["score"][0] >= t_off["rollout"][1]
    assert t_on["score"][0] < t_on["rollout"][1]
    # the rollout breaks after its first part while the scoring waits for the next one
    _rollout_fails_mid_stream(tmp_path, tiny_world, monkeypatch)
    assert _files(tmp_path / "broken") == files_off


def _rollout_fails_mid_stream(tmp_path, tiny_world, monkeypatch) -> None:
    """A streamed run whose rollout breaks at its second part: the run fails with the rollout's
    error (not the scoring's "stopped without part"), what was committed stays, and a resume
    completes it (the caller compares its files with a run that never failed)."""
    import fsspec

    from flows.run import opd_run
    from opd_tasks.engines.hf import HFGenerator
    from storage.manifest import read_manifest
    from storage.shards import part_name
    real, calls, fs = HFGenerator.generate, [], fsspec.filesystem("file")

    def breaks(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the rollout engine broke at its second part")
        return real(self, *a, **k)
    cfg = write_config(tmp_path / "broken.yaml", tiny_config(tiny_world, scoring={"streaming": "on"}))
    monkeypatch.setattr(HFGenerator, "generate", breaks)
    with pytest.raises(RuntimeError, match="broke at its second part"):
        opd_run(cfg, run_dir=str(tmp_path / "broken"))
    stage = tmp_path / "broken" / "iter-000000"
    assert len(calls) == 2 and read_manifest(fs, str(stage / "rollout")) is None
    assert [p.name for p in (stage / "rollout").glob("part-*.parquet")] == [part_name(0)]
    assert read_manifest(fs, str(stage / "scored")) is None
    monkeypatch.setattr(HFGenerator, "generate", real)
    assert opd_run(cfg, run_dir=str(tmp_path / "broken"), return_state=True).is_completed()

