"""The trainer's chunked output layer (train.logp_chunk_tokens) and activation checkpointing against
the full-logits path: same s_t and same parameter gradients, plain and under FSDP2."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from train_helpers import build_tiny_model, scored_table
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.logprobs import gather_response, token_logp
from opd_tasks.trainer.batching import collate, rows_from_table
from opd_tasks.trainer.distributed import (close_distributed, enable_activation_checkpointing, init_distributed,
                                           shard_model)
from opd_tasks.trainer.loop import lean_head, response_logp


def _grads(model, mb, chunk):
    model.zero_grad(set_to_none=True)
    logp = response_logp(model, mb, torch.device("cpu"), chunk)
    up = torch.linspace(-1.0, 2.0, logp.numel()).reshape(logp.shape)  # weights every token differently
    (logp * up).sum().backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    return logp.detach(), grads


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied-embeddings"])
@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp"])
def test_chunked_response_logp_equals_full_logits(tmp_path, tie, fsdp):
    model_dir = build_tiny_model(tmp_path / "m", seed=3, tie=tie)
    rows = rows_from_table(scored_table(n_prompts=3, group=2, seed=6), "t")
    mb = collate(rows, list(range(len(rows))))  # rows of different lengths: padding in the batch
    d = init_distributed("cpu")
    try:
        model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), d.mesh, force=fsdp)
        assert lean_head(model) is not None
        want, want_g = _grads(model, mb, 0)
        got, got_g = _grads(model, mb, 3)  # 3 response tokens per chunk: many chunks
    finally:
        close_distributed(d)
    assert int(mb["response_len"].sum()) > 3 * 4
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got[~mb["mask"]] == 0).all()
    for name, g in want_g.items():
        torch.testing.assert_close(got_g[name], g, rtol=0, atol=1e-5, msg=name)
    assert want_g["lm_head.weight" if not tie else "model.embed_tokens.weight"].abs().max() > 1e-3


def test_activation_checkpointing_keeps_values_and_gradients(tmp_path, tiny_model_dir):
    rows = rows_from_table(scored_table(n_prompts=3, group=2, seed=7), "t")
    mb = collate(rows, list(range(len(rows))))
    d = init_distributed("cpu")
    try:
        out, calls = [], []
        for ac in (False, True):
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            if ac:
                enable_activation_checkpointing(model)
            model = shard_model(model, d.mesh, force=True).train()
            assert lean_head(model) is not None  # its one-time check runs before the count
            n = [0]
            model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: n.__setitem__(0, n[0] + 1))
            out.append(_grads(model, mb, 4))
            calls.append(n[0])
    finally:
        close_distributed(d)
    assert calls == [1, 2]  # checkpointed: the block's inside ran again in backward
    torch.testing.assert_close(out[1][0], out[0][0], rtol=0, atol=1e-6)
    for name, g in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], g, rtol=0, atol=1e-6, msg=name)


def test_models_with_transformed_logits_take_the_full_path(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert lean_head(model) is model.lm_head
    soft = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    forward = soft.forward

    def softcapped(*args, **kwargs):  # Gemma-2 style: the logits are not lm_head(hidden)
        out = forward(*args, **kwargs)
        out["logits"] = torch.tanh(out.logits / 3.0) * 3.0
        return out

    soft.forward = softcapped
    assert lean_head(soft) is None
    rows = rows_from_table(scored_table(n_prompts=2, group=2, seed=9), "t")
    mb = collate(rows, list(range(len(rows))))
    with torch.no_grad():  # the full path with the model's own logits, not the chunked head's
        want = gather_response(token_logp(soft(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits,
                                          mb["input_ids"]), mb["start"], mb["response_len"])[0]
        torch.testing.assert_close(response_logp(soft, mb, torch.device("cpu"), 4), want, rtol=0, atol=0)
