"""Losses against hand-written float64 math: values, gradients w.r.t. logp, clip, TIS, masking,
aggregation, gradient accumulation, and the two statistical facts the module relies on
(k2's gradient is the reverse-KL gradient in expectation; rkl steps lower the reverse KL)."""
import dataclasses
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_tasks.losses import (LossParams, annealed_w_kd, compute_loss, discounted_returns, gopd_loss,
                              group_advantages, kdrl_loss, rkl_loss)

D = torch.float64


# ---- a hand-written reference: python floats, one token at a time -------------------------------

def _surr(rho, adv, p):
    """(-min(rho A, clip(rho) A), d/ds of it) with d rho / ds = rho."""
    lo = -math.inf if p.clip_eps_low is None else 1 - p.clip_eps_low
    hi = math.inf if p.clip_eps_high is None else 1 + p.clip_eps_high
    unclipped, clipped = -rho * adv, -min(max(rho, lo), hi) * adv
    return (clipped, 0.0) if clipped > unclipped else (unclipped, -rho * adv)


def _returns(r_row, m_row, gamma):
    out = []
    for t in range(len(r_row)):
        out.append(sum(gamma ** (k - t) * r_row[k] for k in range(t, len(r_row)) if m_row[k]) if gamma else r_row[t])
    return out


def reference(p, s, T, m, old=None, b=None, R=None, A=None, rewards=None, normalizer=None):
    """Loss and d loss / d s of docs/algorithms.md, written out per token. Tensors in, floats out."""
    s, T, m = s.tolist(), T.tolist(), m.tolist()
    old = s if old is None else old.tolist()
    b = b.tolist() if b is not None else None
    R = R.tolist() if R is not None else None
    B, L = len(s), len(s[0])
    loss, grad = 0.0, [[0.0] * L for _ in range(B)]
    n_tok = sum(sum(1 for v in row if v) for row in m)
    for i in range(B):
        r = [T[i][t] - s[i][t] + ((p.lam - 1) * (T[i][t] - R[i][t]) if R else 0.0) for t in range(L)]
        G = _returns(r, m[i], p.discount)
        G_kd = _returns([T[i][t] - s[i][t] for t in range(L)], m[i], p.discount)
        kd_on = not (p.kd_only_incorrect and rewards[i] >= 1)
        n_seq = sum(1 for v in m[i] if v)
        if p.aggregation == "token_mean":
            coef = 1.0 / (normalizer or max(n_tok, 1))
        else:
            coef = 1.0 / (max(n_seq, 1) * (normalizer or B))
        for t in range(L):
            if not m[i][t]:
                continue
            rho = math.exp(s[i][t] - old[i][t])
            w = 1.0 if p.tis_cap is None else min(math.exp(old[i][t] - b[i][t]), p.tis_cap)
            if p.kind in ("rkl", "gopd"):
                lt, gt = _surr(rho, G[t], p)
            elif p.kd_estimator == "reward":
                adv = p.w_rl * (float(A[i]) if p.w_rl else 0.0) + p.w_kd * (T[i][t] - old[i][t]) * kd_on
                lt, gt = _surr(rho, adv, p)
            else:
                lt, gt = _surr(rho, float(A[i]), p) if p.w_rl else (0.0, 0.0)
                lt, gt = p.w_rl * lt, p.w_rl * gt
                d = T[i][t] - s[i][t]
                if p.kd_estimator == "k2":
                    kl, gkl = 0.5 * d * d, -d
                elif p.kd_estimator == "k3":
                    kl, gkl = math.exp(d) - d - 1, 1 - math.exp(d)
                else:
                    kl, gkl = _surr(rho, G_kd[t], p)
                lt, gt = lt + p.w_kd * kd_on * kl, gt + p.w_kd * kd_on * gkl
            loss += coef * w * lt
            grad[i][t] = coef * w * gt
    return loss, grad


def make_batch(B=3, L=5, seed=0, spread=0.6):
    """Random float64 batch; old = s + noise so that ratios straddle the clip range; row 0 is padded."""
    g = torch.Generator().manual_seed(seed)
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=D)  # noqa: E731
    s = -3 * u(B, L) - 0.05
    batch = dict(logp=s.clone().requires_grad_(), old_logp=s + spread * (2 * u(B, L) - 1),
                 teacher_logp=-3 * u(B, L), ref_logp=-3 * u(B, L), mask=torch.ones(B, L, dtype=torch.bool),
                 advantages=torch.randn(B, generator=g, dtype=D), rewards=torch.tensor([1.0, 0.0, 0.5][:B], dtype=D))
    batch["behaviour_logp"] = batch["old_logp"] + 1.2 * (2 * u(B, L) - 1)  # exp(old - b) in [0.3, 3.3]: cap 2 bites
    batch["mask"][0, L - 2:] = False
    return batch


def ref_of(p, batch, normalizer=None):
    return reference(p, batch["logp"].detach(), batch["teacher_logp"], batch["mask"], old=batch["old_logp"],
                     b=batch["behaviour_logp"], R=batch["ref_logp"] if p.kind == "gopd" else None,
                     A=batch["advantages"], rewards=batch["rewards"], normalizer=normalizer)


CASES = [
    LossParams(kind="rkl"),
    LossParams(kind="rkl", clip_eps_low=None, clip_eps_high=None, tis_cap=None),
    LossParams(kind="rkl", discount=0.9, aggregation="seq_mean"),
    LossParams(kind="rkl", clip_eps_low=0.1, clip_eps_high=None, tis_cap=1.5, discount=1.0),
    LossParams(kind="gopd", lam=1.25),
    LossParams(kind="gopd", lam=0.5, aggregation="seq_mean", discount=0.5),
    *[LossParams(kind="kdrl", kd_estimator=e, w_kd=0.3) for e in ("k2", "pg", "k3", "reward")],
    *[LossParams(kind="kdrl", kd_estimator=e, w_rl=0.7, w_kd=0.4, aggregation="seq_mean", kd_only_incorrect=True,
                 discount=0.8, clip_eps_high=0.05) for e in ("k2", "pg", "k3", "reward")],
    *[LossParams(kind="kdrl", kd_estimator=e, w_rl=0.0, w_kd=1.0, tis_cap=None) for e in ("k2", "pg", "k3", "reward")],
]


def case_id(p):
    """The fields a case sets, e.g. kind=gopd,lam=1.25."""
    default = LossParams()
    return ",".join(f"{f.name}={getattr(p, f.name)}" for f in dataclasses.fields(p)
                    if f.name == "kind" or getattr(p, f.name) != getattr(default, f.name))


@pytest.mark.parametrize("p", CASES, ids=case_id)
def test_value_and_gradient_match_hand_computation(p):
    batch = make_batch()
    loss, metrics = compute_loss(p, batch)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    want_loss, want_grad = ref_of(p, batch)
    assert abs(loss.item() - want_loss) < 1e-12 and metrics["loss"] == loss.item()
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=D), rtol=0, atol=1e-12)
    assert grad[0, -2:].abs().sum() == 0  # padding
    surrogate = p.kind != "kdrl" or p.w_rl > 0 or p.kd_estimator in ("pg", "reward")
    clips = p.clip_eps_low is not None or p.clip_eps_high is not None
    assert (metrics["clip_frac"] > 0) == (surrogate and clips)  # the clipped branch is exercised


@pytest.mark.parametrize("est", ["k2", "k3"])
def test_gradcheck_where_no_stop_gradient(est):
    # rkl/gopd/pg put sg(s) in the reward, so a finite difference (which moves sg(s) too) is not their
    # gradient by design; GRPO + k2/k3 have none and must pass a numerical check.
    batch = make_batch()
    p = LossParams(kind="kdrl", kd_estimator=est, w_kd=0.5, clip_eps_low=0.15, clip_eps_high=0.15)
    fn = lambda s: compute_loss(p, {**batch, "logp": s})[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (batch["logp"],), eps=1e-6, atol=1e-8)


def test_gopd_lambda_one_is_rkl_bit_for_bit():
    batch = {k: (v.float() if v.is_floating_point() else v) for k, v in make_batch(B=3, L=7, seed=3).items()}
    batch["logp"] = batch["logp"].detach().requires_grad_()
    for kw in ({}, {"discount": 0.7, "aggregation": "seq_mean"}):
        a, ma = rkl_loss(batch["logp"], batch["teacher_logp"], batch["mask"], old_logp=batch["old_logp"],
                         behaviour_logp=batch["behaviour_logp"], params=LossParams(kind="rkl", **kw))
        for ref in (batch["ref_logp"], None):
            g, mg = gopd_loss(batch["logp"], batch["teacher_logp"], batch["mask"], ref_logp=ref,
                              old_logp=batch["old_logp"], behaviour_logp=batch["behaviour_logp"],
                              params=LossParams(kind="gopd", lam=1.0, **kw))
            assert torch.equal(a, g) and ma["reward_mean"] == mg["reward_mean"]
            assert torch.equal(torch.autograd.grad(a, batch["logp"], retain_graph=True)[0],
                               torch.autograd.grad(g, batch["logp"])[0])


def test_gopd_reward_is_minus_the_papers_advantage():
    batch = make_batch(seed=4)
    s, T, R, lam = batch["logp"].detach(), batch["teacher_logp"], batch["ref_logp"], 1.25
    _, metrics = gopd_loss(s, T, batch["mask"], ref_logp=R, params=LossParams(kind="gopd", lam=lam, tis_cap=None))
    paper_adv = (s - T) + (lam - 1) * (R - T)
    m = batch["mask"]
    assert metrics["reward_mean"] == pytest.approx(-(paper_adv[m].mean().item()), abs=1e-12)


@pytest.mark.parametrize("p", CASES[:1] + CASES[2:3] + CASES[4:14], ids=case_id)
def test_split_micro_batches_with_global_normalizer_sum_to_whole(p):
    batch = make_batch(B=3, L=6, seed=5)
    whole, _ = compute_loss(p, batch)
    (g_whole,) = torch.autograd.grad(whole, batch["logp"])
    norm = float(batch["mask"].sum()) if p.aggregation == "token_mean" else 3.0
    parts = [compute_loss(p, {k: v[sl] for k, v in batch.items()}, normalizer=norm)[0]
             for sl in (slice(0, 1), slice(1, 3))]
    (g_split,) = torch.autograd.grad(sum(parts), batch["logp"])
    assert abs(sum(parts).item() - whole.item()) < 1e-12
    torch.testing.assert_close(g_split, g_whole, rtol=0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(B=st.integers(2, 5), L=st.integers(1, 6), cut=st.integers(1, 4), seed=st.integers(0, 10_000),
       agg=st.sampled_from(["token_mean", "seq_mean"]))
def test_split_property(B, L, cut, seed, agg):
    cut = min(cut, B - 1)
    batch = make_batch(B=3, L=max(L, 2), seed=seed)
    batch = {k: torch.cat([v] * 2)[:B] for k, v in batch.items()}
    batch["logp"] = batch["logp"].detach().requires_grad_()
    p = LossParams(kind="gopd", lam=1.5, aggregation=agg, discount=0.5)
    norm = float(batch["mask"].sum()) if agg == "token_mean" else float(B)
    whole = compute_loss(p, batch)[0]
    split = sum(compute_loss(p, {k: v[sl] for k, v in batch.items()}, normalizer=norm)[0]
                for sl in (slice(0, cut), slice(cut, B)))
    assert abs(whole.item() - split.item()) < 1e-12


@pytest.mark.parametrize("p", [CASES[0], CASES[2], CASES[4], CASES[10], CASES[12], CASES[13]], ids=case_id)
def test_padding_changes_nothing_even_garbage(p):
    batch = make_batch(seed=6)
    loss, metrics = compute_loss(p, batch)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    padded = {}
    for k, v in batch.items():
        if v.dim() == 2:
            fill = False if k == "mask" else math.nan
            v = torch.cat([v.detach(), torch.full((v.shape[0], 3), fill, dtype=v.dtype)], dim=1)
            if k != "mask":
                v[0, 3] = math.inf  # a padded slot inside row 0
            if k == "logp":
                v.requires_grad_()
        padded[k] = v
    loss2, metrics2 = compute_loss(p, padded)
    (grad2,) = torch.autograd.grad(loss2, padded["logp"])
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-14)
    assert metrics2 == pytest.approx(metrics, abs=1e-14)
    torch.testing.assert_close(grad2[:, :5], grad, rtol=0, atol=1e-14)
    assert torch.equal(grad2[:, 5:], torch.zeros(3, 3, dtype=D)) and grad2[0, 3] == 0


def test_ppo_clip_zeroes_gradient_only_on_the_pessimistic_side():
    # rkl with rho = exp(s - old) set per token and reward r = T - s chosen per token.
    rho = torch.tensor([[1.5, 1.5, 0.5, 0.5, 1.1, 0.9]], dtype=D)
    r = torch.tensor([[1.0, -1.0, -1.0, 1.0, 1.0, -1.0]], dtype=D)
    s = torch.full_like(rho, -1.0).requires_grad_()
    old, T, m = s.detach() - rho.log(), s.detach() + r, torch.ones_like(rho, dtype=torch.bool)
    p = LossParams(kind="rkl", tis_cap=None)
    loss, metrics = rkl_loss(s, T, m, old_logp=old, params=p)
    (grad,) = torch.autograd.grad(loss, s)
    # rho > 1.2 with A > 0 and rho < 0.8 with A < 0: clipped, no gradient; the others: -rho A / n
    want = torch.tensor([[0.0, 1.5, 0.0, -0.5, -1.1, 0.9]], dtype=D) / 6
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-15)
    assert metrics["clip_frac"] == pytest.approx(2 / 6)
    assert metrics["ratio_max"] == pytest.approx(1.5) and metrics["ratio_mean"] == pytest.approx(6.0 / 6)
    want_loss = -(1.2 * 1 + 1.5 * -1 + 0.8 * -1 + 0.5 * 1 + 1.1 * 1 + 0.9 * -1) / 6
    assert loss.item() == pytest.approx(want_loss, abs=1e-14)
    # no clip: every token moves; one-sided clip: only that side
    (g_none,) = torch.autograd.grad(rkl_loss(s, T, m, old_logp=old, params=LossParams(
        kind="rkl", tis_cap=None, clip_eps_low=None, clip_eps_high=None))[0], s)
    torch.testing.assert_close(g_none, -rho * r / 6, rtol=0, atol=1e-15)
    (g_hi,) = torch.autograd.grad(rkl_loss(s, T, m, old_logp=old, params=LossParams(
        kind="rkl", tis_cap=None, clip_eps_low=None))[0], s)
    assert (g_hi == 0).tolist() == [[True, False, False, False, False, False]]


def test_tis_weights_are_capped_importance_ratios():
    old = torch.full((1, 4), -1.0, dtype=D)
    b = old - torch.tensor([[0.5, 1.5, 3.0, 10.0]], dtype=D).log()  # exp(old - b) = 0.5, 1.5, 3, 10
    s = old.clone().requires_grad_()
    T = old + torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D)
    m = torch.ones(1, 4, dtype=torch.bool)
    loss, metrics = rkl_loss(s, T, m, old_logp=old, behaviour_logp=b, params=LossParams(kind="rkl", tis_cap=2.0))
    w = [0.5, 1.5, 2.0, 2.0]
    assert loss.item() == pytest.approx(-(0.5 * 1 + 1.5 * 2 + 2 * 3 + 2 * 4) / 4, abs=1e-14)
    assert metrics["tis_weight_mean"] == pytest.approx(sum(w) / 4)
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, -torch.tensor([w], dtype=D) * (T - old) / 4, rtol=0, atol=1e-15)
    off, m_off = rkl_loss(s, T, m, old_logp=old, params=LossParams(kind="rkl", tis_cap=None))
    assert off.item() == pytest.approx(-10 / 4) and m_off["tis_weight_mean"] == 1.0
    with pytest.raises(ValueError, match="behaviour_logp"):
        rkl_loss(s, T, m, old_logp=old, params=LossParams(kind="rkl"))


def test_seq_mean_weights_sequences_token_mean_weights_tokens():
    s = torch.full((2, 4), -1.0, dtype=D)
    T = s + torch.tensor([[1.0, 1.0, 0, 0], [-1.0, -1.0, -1.0, -1.0]], dtype=D)
    m = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    tok = rkl_loss(s, T, m, params=LossParams(tis_cap=None))[0]
    seq = rkl_loss(s, T, m, params=LossParams(tis_cap=None, aggregation="seq_mean"))[0]
    assert tok.item() == pytest.approx(-(2 * 1 - 4 * 1) / 6) and seq.item() == pytest.approx(0.0, abs=1e-15)
    m_full = torch.ones(2, 4, dtype=torch.bool)  # equal lengths: the two coincide
    a = rkl_loss(s, T, m_full, params=LossParams(tis_cap=None))[0]
    b = rkl_loss(s, T, m_full, params=LossParams(tis_cap=None, aggregation="seq_mean"))[0]
    assert a.item() == pytest.approx(b.item(), abs=1e-15)


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], dtype=D)
    m = torch.tensor([[1, 1, 0, 1], [1, 1, 1, 0]], dtype=torch.bool)  # a hole; a padded tail
    g = 0.5
    want = [[1 + g * 2 + g ** 3 * 4, 2 + g ** 2 * 4, 0, 4], [5 + g * 6 + g * g * 7, 6 + g * 7, 7, 0]]
    torch.testing.assert_close(discounted_returns(r, m, g), torch.tensor(want, dtype=D), rtol=0, atol=1e-15)
    assert torch.equal(discounted_returns(r, m, 0.0), r * m)
    torch.testing.assert_close(discounted_returns(r, m, 1.0), (r * m).flip(1).cumsum(1).flip(1) * m)


def test_kd_only_incorrect_leaves_correct_responses_alone():
    batch = make_batch(seed=7)  # rewards 1, 0, 0.5
    p = LossParams(kind="kdrl", w_rl=0.0, w_kd=1.0, kd_only_incorrect=True, tis_cap=None)
    loss, _ = compute_loss(p, batch)
    (grad,) = torch.autograd.grad(loss, batch["logp"])
    assert grad[0].abs().sum() == 0 and (grad[1:] != 0).all()
    s, T, m = batch["logp"].detach(), batch["teacher_logp"], batch["mask"]
    want = (0.5 * (s - T) ** 2)[1:].sum() / m.sum()  # normalizer stays all valid tokens
    assert loss.item() == pytest.approx(want.item(), abs=1e-14)
    with pytest.raises(ValueError, match="rewards"):
        compute_loss(p, {k: v for k, v in batch.items() if k != "rewards"})


@pytest.mark.parametrize("est", ["k2", "pg", "k3", "reward"])
def test_kdrl_without_rl_is_pure_kd(est):
    batch = make_batch(seed=8)
    batch.pop("advantages")  # pure KD needs no verifier
    p = LossParams(kind="kdrl", w_rl=0.0, w_kd=0.25, kd_estimator=est, aggregation="seq_mean")
    loss, _ = compute_loss(p, batch)
    s, T, old, m = batch["logp"], batch["teacher_logp"], batch["old_logp"], batch["mask"]
    w = (old - batch["behaviour_logp"]).exp().clamp(max=2.0)
    lens = m.sum(1)
    agg = lambda x: ((x * w * m).sum(1) / lens).mean()  # noqa: E731
    if est == "pg":
        want = p.w_kd * rkl_loss(s, T, m, old_logp=old, behaviour_logp=batch["behaviour_logp"], params=p)[0]
    elif est == "k2":
        want = p.w_kd * agg(0.5 * (s - T) ** 2)
    elif est == "k3":
        want = p.w_kd * agg(torch.exp(T - s) - (T - s) - 1)
    else:  # the reward form: clipped surrogate on A_t = w_kd (T - old), no separate KD term
        rho, A = torch.exp(s - old), p.w_kd * (T - old)
        want = agg(torch.maximum(-rho * A, -rho.clamp(0.8, 1.2) * A))
    assert loss.item() == pytest.approx(want.item(), abs=1e-14)
    g1, g2 = torch.autograd.grad(loss, s)[0], torch.autograd.grad(want, s)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-14)


def test_on_policy_k2_pg_and_reward_give_the_same_gradient():
    batch = make_batch(seed=9)
    batch["old_logp"] = batch["logp"].detach()
    grads = []
    for est in ("k2", "pg", "reward"):
        p = LossParams(kind="kdrl", w_rl=0.5, w_kd=0.3, kd_estimator=est, tis_cap=None)
        grads.append(torch.autograd.grad(compute_loss(p, batch)[0], batch["logp"])[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-14)
    torch.testing.assert_close(grads[0], grads[2], rtol=0, atol=1e-14)


# ---- statistics: what the estimators do in expectation ------------------------------------------

def _categorical(V=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(V, generator=g, dtype=D).requires_grad_()
    logq = torch.log_softmax(2 * torch.randn(V, generator=g, dtype=D), 0)
    return theta, logq, g


def _kd_grad(theta, logq, ys, est, weights=None):
    """Gradient w.r.t. theta of the pure-KD kdrl loss on sampled tokens ys (one token per sequence)."""
    logp = torch.log_softmax(theta, 0)[ys].unsqueeze(1)
    p = LossParams(kind="kdrl", w_rl=0.0, w_kd=1.0, kd_estimator=est, tis_cap=None, aggregation="seq_mean")
    if weights is None:
        loss = compute_loss(p, {"logp": logp, "teacher_logp": logq[ys].unsqueeze(1),
                                "mask": torch.ones_like(logp, dtype=torch.bool)})[0]
    else:  # exact expectation: every outcome once, weighted by its probability
        per = [compute_loss(p, {"logp": logp[i:i + 1], "teacher_logp": logq[ys[i:i + 1]].unsqueeze(1),
                                "mask": torch.ones(1, 1, dtype=torch.bool)})[0] for i in range(len(ys))]
        loss = sum(w * l for w, l in zip(weights, per))
    return torch.autograd.grad(loss, theta)[0]


def test_k2_gradient_is_the_reverse_kl_gradient_in_expectation():
    theta, logq, g = _categorical()
    logp = torch.log_softmax(theta, 0)
    exact = torch.autograd.grad((logp.exp() * (logp - logq)).sum(), theta, retain_graph=True)[0]  # grad KL(p || q)
    forward = torch.autograd.grad(-(logq.exp() * logp).sum(), theta, retain_graph=True)[0]  # grad KL(q || p)
    probs, ys = logp.detach().exp(), torch.arange(6)
    # exact expectation over the 6 outcomes
    torch.testing.assert_close(_kd_grad(theta, logq, ys, "k2", probs), exact, rtol=0, atol=1e-12)
    # why k3 is documented as forward KL, and why k1 is not offered (zero expected gradient)
    torch.testing.assert_close(_kd_grad(theta, logq, ys, "k3", probs), forward, rtol=0, atol=1e-12)
    k1 = torch.autograd.grad(sum(w * logp[y] for w, y in zip(probs, ys)), theta)[0]
    torch.testing.assert_close(k1, torch.zeros(6, dtype=D), rtol=0, atol=1e-12)
    # large sample: the mean of per-sample k2 gradients lands within 5 standard errors of the exact one
    n = 200_000
    samples = torch.multinomial(probs, n, replacement=True, generator=g)
    mc = _kd_grad(theta, logq, samples, "k2")
    per_outcome = (logp - logq).detach().unsqueeze(1) * (torch.eye(6, dtype=D) - probs)  # [y, theta]
    se = ((probs.unsqueeze(1) * (per_outcome - exact) ** 2).sum(0) / n).sqrt()
    assert ((mc - exact).abs() < 5 * se).all(), (mc, exact, se)
    assert (exact.abs() > 20 * se).any()  # the check has teeth: the signal is far above the noise


@pytest.mark.parametrize("kind", ["rkl", "kdrl-k2"])
def test_a_few_steps_lower_the_exact_reverse_kl(kind):
    theta, logq, g = _categorical(V=8, seed=1)
    opt = torch.optim.SGD([theta], lr=0.5)
    p = (LossParams(kind="rkl", tis_cap=None) if kind == "rkl"
         else LossParams(kind="kdrl", w_rl=0.0, w_kd=1.0, kd_estimator="k2", tis_cap=None))
    kl = lambda: (torch.softmax(theta, 0) * (torch.log_softmax(theta, 0) - logq)).sum().item()  # noqa: E731
    start = kl()
    for _ in range(40):
        logp_all = torch.log_softmax(theta, 0)
        ys = torch.multinomial(logp_all.detach().exp(), 256, replacement=True, generator=g)
        logp = logp_all[ys].reshape(16, 16)
        batch = {"logp": logp, "old_logp": logp.detach(), "teacher_logp": logq[ys].reshape(16, 16),
                 "mask": torch.ones(16, 16, dtype=torch.bool)}
        opt.zero_grad()
        compute_loss(p, batch)[0].backward()
        opt.step()
    assert start > 0.5 and kl() < 0.2 * start, (start, kl())


# ---- group advantages, annealing ----------------------------------------------------------------

def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.25, 0.3, 0.3, 0.3, 5.0, 2.0, 0.0], dtype=torch.float32)
    ids = torch.tensor([7, 7, 7, 7, -2, -2, -2, 40, 3, 3])
    got = group_advantages(rewards, ids)
    want = []
    for i, r in enumerate(rewards.tolist()):
        grp = [x for x, j in zip(rewards.tolist(), ids.tolist()) if j == ids[i]]
        sd = statistics.stdev(grp) if len(grp) > 1 else 0.0
        want.append(0.0 if max(grp) == min(grp) else (r - statistics.mean(grp)) / (sd + 1e-6))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-6, atol=1e-6)
    assert got.dtype == torch.float32
    assert torch.equal(got[4:8], torch.zeros(4))  # identical rewards and a singleton
    tenth = torch.full((3,), 0.1, dtype=D)  # float64: 0.1 + 0.1 + 0.1 != 0.3, the mean is off by an ulp
    assert torch.equal(group_advantages(tenth, torch.zeros(3, dtype=torch.long)), torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, ids[:3])
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([1.0, math.nan]), torch.tensor([0, 0]))


def test_annealed_w_kd():
    assert annealed_w_kd(5e-3, 1e-3, 0, 5) == 5e-3
    assert annealed_w_kd(5e-3, 1e-3, 2, 5) == pytest.approx(3e-3)
    assert annealed_w_kd(5e-3, 1e-3, 4, 5) == pytest.approx(1e-3)
    assert annealed_w_kd(5e-3, 1e-3, 9, 5) == pytest.approx(1e-3)
    assert annealed_w_kd(5e-3, None, 3, 5) == 5e-3 and annealed_w_kd(5e-3, 1e-3, 0, 1) == 5e-3


# ---- metrics and errors ---------------------------------------------------------------------------

def test_metrics_by_hand():
    batch = make_batch(seed=10)
    batch["teacher_logp.math"], batch["teacher_logp.code"] = batch["teacher_logp"] - 0.5, batch["ref_logp"]
    _, mt = compute_loss(LossParams(kind="rkl"), batch)
    m, old, T = batch["mask"], batch["old_logp"], batch["teacher_logp"]
    rho = (batch["logp"].detach() - old).exp()[m]
    assert mt["tokens"] == 13 and mt["sequences"] == 3
    assert mt["kl_k1"] == pytest.approx((old - T)[m].mean().item(), abs=1e-12)
    assert mt["kl_k3"] == pytest.approx(((T - old).exp() - (T - old) - 1)[m].mean().item(), abs=1e-12)
    assert mt["kl_k1/math"] == pytest.approx(mt["kl_k1"] + 0.5, abs=1e-12)
    assert mt["kl_k1/code"] == pytest.approx((old - batch["ref_logp"])[m].mean().item(), abs=1e-12)
    assert mt["ratio_mean"] == pytest.approx(rho.mean().item()) and mt["ratio_max"] == pytest.approx(rho.max().item())
    tis = (old - batch["behaviour_logp"]).exp().clamp(max=2)[m]
    assert mt["tis_weight_mean"] == pytest.approx(tis.mean().item())
    assert mt["reward_mean"] == pytest.approx((T - batch["logp"].detach())[m].mean().item())
    assert 0 < mt["clip_frac"] < 1 and all(type(v) is float for v in mt.values())
    _, mk = compute_loss(LossParams(kind="kdrl"), batch)
    assert mk["reward_mean"] == pytest.approx(0.5) and {"loss_rl", "loss_kd"} <= set(mk)


def test_bad_input_is_named():
    batch = make_batch()
    with pytest.raises(ValueError, match=r"teacher_logp has shape \(3, 4\)"):
        compute_loss(LossParams(), {**batch, "teacher_logp": batch["teacher_logp"][:, :4]})
    bad = batch["teacher_logp"].clone()
    bad[1, 1] = math.nan
    with pytest.raises(ValueError, match="teacher_logp holds 1 nan/inf"):
        compute_loss(LossParams(), {**batch, "teacher_logp": bad})
    with pytest.raises(ValueError, match="ref_logp"):
        compute_loss(LossParams(kind="gopd", lam=1.25), {k: v for k, v in batch.items() if k != "ref_logp"})
    with pytest.raises(ValueError, match="advantages"):
        compute_loss(LossParams(kind="kdrl"), {k: v for k, v in batch.items() if k != "advantages"})
    with pytest.raises(ValueError, match=r"advantages must be \[B\]"):
        compute_loss(LossParams(kind="kdrl"), {**batch, "advantages": batch["advantages"][:2]})
    with pytest.raises(ValueError, match="lacks"):
        compute_loss(LossParams(), {"logp": batch["logp"]})
    with pytest.raises(ValueError, match="normalizer"):
        compute_loss(LossParams(), batch, normalizer=0)
    for field, value in (("kind", "k1"), ("kd_estimator", "k1"), ("aggregation", "sum"), ("lam", 0.0),
                         ("discount", 1.5), ("clip_eps_low", 1.5), ("tis_cap", 0.0), ("w_kd", -1.0),
                         ("lam", math.nan)):
        with pytest.raises(ValueError, match=f"loss.{field}"):
            LossParams(**{field: value})


def test_gopd_with_two_references_in_one_batch_matches_hand_computation():
    """Reward correction: rows routed to two teachers carry ref_logp from two different bases
    (teachers[].reference); the loss reads ref_logp per token, so each row uses its own."""
    batch = make_batch(B=3, L=6, seed=7)
    base_a, base_b = -3 * torch.rand(3, 6, dtype=D), -0.5 * torch.rand(3, 6, dtype=D)  # two distinct bases
    routed_to_a = torch.tensor([True, False, True])
    batch["ref_logp"] = torch.where(routed_to_a[:, None], base_a, base_b)
    for p in (LossParams(kind="gopd", lam=1.25), LossParams(kind="gopd", lam=1.5, aggregation="seq_mean")):
        loss, _ = compute_loss(p, batch)
        (grad,) = torch.autograd.grad(loss, batch["logp"])
        want_loss, want_grad = ref_of(p, batch)
        assert abs(loss.item() - want_loss) < 1e-12
        torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=D), rtol=0, atol=1e-12)
        one_base, _ = compute_loss(p, {**batch, "ref_logp": base_a})
        assert abs(one_base.item() - loss.item()) > 1e-6  # the second base changes the loss: it is read
    # lambda = 1: the references cancel, bitwise rkl whatever they are
    f32 = {k: (v.detach().float() if v.is_floating_point() else v) for k, v in batch.items()}
    rkl, _ = compute_loss(LossParams(kind="rkl"), f32)
    for ref in (base_a, batch["ref_logp"]):
        g, _ = compute_loss(LossParams(kind="gopd", lam=1.0), {**f32, "ref_logp": ref.float()})
        assert torch.equal(rkl, g)
