"""The trainer at world size 1 (in process; plain module, or FSDP2 when forced) against a plain
non-sharded step; bf16 mixed precision runs; fused AdamW and DCP state across plain <-> sharded."""
import pytest
import torch
from transformers import AutoModelForCausalLM
from train_helpers import plain_iteration, scored_table
from train_helpers import one_torch_thread  # noqa: F401 - autouse fixture: one torch thread per test

from opd_tasks.losses import LossParams
from opd_tasks.trainer.batching import rows_from_table
from opd_tasks.trainer.distributed import close_distributed, init_distributed, shard_model
from opd_tasks.trainer.loop import LoopConfig, train_iteration
from opd_tasks.trainer.checkpoint import full_state_dict

# Sharding and micro-batching change only the order in which float32 gradients are summed. At Adam's
# default eps (1e-8) that rounding is amplified for gradient elements near zero (sqrt(v) ~ |g|), by a
# machine-dependent amount; at EPS = 1 the update stays within lr * |dg| of the reference, so
# STEPS * LR * 1e-4 bounds the weights on any machine (|dg| <= 1e-4, generous for float32 sums of
# gradients <= 1). Adam's own arithmetic (fused vs single-tensor) is tested on identical gradients.
LR, EPS = 1e-2, 1.0


def _adamw(model, fused, eps=EPS):
    return torch.optim.AdamW(model.parameters(), lr=LR, eps=eps, weight_decay=0.1, fused=fused)


def _plain(model_dir, table, params, cfg, fused=False):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = _adamw(model, fused)
    losses = plain_iteration(model, opt, rows_from_table(table, "t", need_reward=params.kind == "kdrl"), params, cfg)
    return losses, model.state_dict()


def _sharded(model_dir, table, params, cfg, mixed_precision="none", force=True, fused=False):
    d = init_distributed("cpu")
    try:
        model = shard_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), d.mesh,
                            mixed_precision, force=force)
        opt = _adamw(model, fused)
        out = train_iteration(model, opt, rows_from_table(table, "t", need_reward=params.kind == "kdrl"), params,
                              cfg, d.device)
        return [s["loss"] for s in out["steps"]], full_state_dict(model), out
    finally:
        close_distributed(d)


@pytest.mark.parametrize("force, fused", [(True, False), (False, False), (False, True)],
                         ids=["fsdp", "plain-module", "plain-module-fused-adamw"])
@pytest.mark.parametrize("params", [LossParams(kind="rkl"),
                                    LossParams(kind="kdrl", w_kd=0.5, aggregation="seq_mean")],
                         ids=["rkl-token_mean", "kdrl-seq_mean"])
def test_world1_with_micro_batches_matches_plain_steps(tiny_model_dir, params, force, fused):
    table = scored_table(n_prompts=6, group=2, seed=1)
    # 3 steps over 2 epochs; a 40-token budget splits each mini-batch into several micro-batches
    cfg = LoopConfig(epochs=2, mini_batches=2, micro_batch_tokens=40, grad_clip=0.5, seed=3, iteration=1)
    want, want_sd = _plain(tiny_model_dir, table, params, cfg, fused=fused)
    got, got_sd, out = _sharded(tiny_model_dir, table, params, cfg, force=force, fused=fused)
    assert len(got) == 4
    assert max(s["padded_tokens"] for s in out["steps"]) > 40  # more than one micro-batch per step
    np_diff = max(abs(a - b) for a, b in zip(want, got))
    assert np_diff < 1e-5, (want, got)
    for k, v in want_sd.items():
        torch.testing.assert_close(got_sd[k], v, rtol=0, atol=len(got) * LR * 1e-4, msg=k)
    assert any((want_sd[k] - v).abs().max() > 1e-3 for k, v in
               AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().items())  # it did train


@pytest.mark.parametrize("eps", [1e-8, EPS])
def test_fused_adamw_equals_single_tensor_adamw_on_the_same_gradients(eps):
    """The trainer's fused AdamW against torch's reference loop, fed identical gradients (some
    near zero, where eps matters): only the update's own float32 arithmetic may differ."""
    torch.manual_seed(0)
    shapes = [(7, 5), (33,), (4, 4, 3)]
    init = [torch.randn(s) for s in shapes]
    ps = {f: [torch.nn.Parameter(w.clone()) for w in init] for f in (True, False)}
    opts = {f: torch.optim.AdamW(ps[f], lr=LR, eps=eps, weight_decay=0.1, fused=f) for f in ps}
    for _ in range(5):
        grads = [torch.randn(s) * torch.logspace(-9, 0, s[0]).reshape(-1, *[1] * (len(s) - 1)) for s in shapes]
        for f in ps:
            for p, g in zip(ps[f], grads):
                p.grad = g.clone()
            opts[f].step()
    for a, b in zip(ps[True], ps[False]):
        # a few float32 ulps of the update (|update| <= lr per step), not of the gradient
        torch.testing.assert_close(a, b, rtol=0, atol=5 * LR * 1e-6)
    assert all((a - w).abs().max() > LR for a, w in zip(ps[True], init))  # it moved


def test_bf16_mixed_precision_trains_close_to_fp32(tiny_model_dir):
    table = scored_table(n_prompts=4, group=2, seed=2)
    cfg = LoopConfig(epochs=1, mini_batches=1, micro_batch_tokens=64)
    p = LossParams(kind="rkl")
    fp32, _, _ = _sharded(tiny_model_dir, table, p, cfg)
    bf16, sd, _ = _sharded(tiny_model_dir, table, p, cfg, mixed_precision="bf16")
    assert all(v.dtype == torch.float32 for v in sd.values())  # master weights stay fp32
    assert abs(fp32[0] - bf16[0]) < 0.05 and fp32[0] != bf16[0]


def test_world1_float32_is_not_sharded_unless_forced_or_bf16(tiny_model_dir):
    from torch.distributed.tensor import DTensor
    d = init_distributed("cpu")
    try:
        def kinds(**kw):
            m = shard_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), d.mesh, **kw)
            return {isinstance(p, DTensor) for p in m.parameters()}
        assert kinds() == {False}
        assert kinds(force=True) == {True}
        assert kinds(mixed_precision="bf16") == {True}  # bf16 compute comes from FSDP2's policy
    finally:
        close_distributed(d)


def test_fsdp_and_plain_steps_agree_to_1e6(tiny_model_dir):
    """The same loop and optimizer with and without fully_shard at world size 1: same numbers."""
    table = scored_table(n_prompts=6, group=2, seed=4)
    cfg = LoopConfig(epochs=1, mini_batches=2, micro_batch_tokens=40)
    p = LossParams(kind="rkl")
    a, sd_a, _ = _sharded(tiny_model_dir, table, p, cfg, force=True, fused=True)
    b, sd_b, _ = _sharded(tiny_model_dir, table, p, cfg, force=False, fused=True)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    for k, v in sd_a.items():
        torch.testing.assert_close(sd_b[k], v, rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("save_sharded", [True, False], ids=["fsdp-to-plain", "plain-to-fsdp"])
def test_train_state_moves_between_plain_and_sharded_and_keeps_fused(tmp_path, tiny_model_dir, save_sharded):
    """DCP state saved by one layout loads into the other; a fused optimizer stays fused even when
    the checkpoint was written by a single-tensor AdamW (older checkpoints)."""
    from opd_tasks.trainer.checkpoint import load_state, save_state
    table = scored_table(n_prompts=4, group=2, seed=5)
    cfg = LoopConfig(epochs=1, mini_batches=1, micro_batch_tokens=64)
    d = init_distributed("cpu")
    try:
        def build(sharded, fused):
            m = shard_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), d.mesh,
                            force=sharded)
            return m, torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused)
        m, opt = build(save_sharded, fused=False)
        train_iteration(m, opt, rows_from_table(table, "t"), LossParams(kind="rkl"), cfg, d.device)
        save_state(m, opt, str(tmp_path / "dcp"), {"step": 1})
        want = full_state_dict(m)
        m2, opt2 = build(not save_sharded, fused=True)
        assert load_state(m2, opt2, str(tmp_path / "dcp")) == {"step": 1}
        got = full_state_dict(m2)
        for k, v in want.items():
            assert torch.equal(got[k], v), k
        assert opt2.param_groups[0]["fused"] is True
        assert all(len(s) == 3 for s in opt2.state.values()) and len(opt2.state) == len(list(m2.parameters()))
    finally:
        close_distributed(d)
