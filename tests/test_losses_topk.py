"""Top-k distillation losses against float64 hand computations: value and analytic gradient per
token, K = vocabulary equals the exact full-vocabulary divergence, the JSD beta limits, the
mixture identities of docs/algorithms.md, the direction test, and bad input."""
import math

import pytest
import torch

from opd_tasks.losses import LossParams, compute_loss, rkl_loss
from opd_tasks.losses_topk import topk_divergence

D = torch.float64
DIVS = [("fkl", 0.5), ("rkl", 0.5), ("jsd", 0.5), ("jsd", 0.2)]


def hand(p_top, q_top, div, beta, tail):
    """One position, python floats: (divergence, d divergence / d log q_k for the K stored ids).
    Buckets b; g_b = dD/dq_b (fkl: -p/q, rkl: log(q/p) + 1, jsd: (1 - beta) log(q/m)); with the
    tail bucket q_t = 1 - sum q_k, so dD/ds_j = q_j (g_j - g_t); renormalized: q^_j (g_j - sum_b q^_b g_b)."""
    p = [math.exp(x) for x in p_top]
    q = [math.exp(x) for x in q_top]
    if tail:
        p, q = p + [1 - sum(p)], q + [1 - sum(q)]
    else:
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)  # noqa: E731
    if div == "fkl":
        val, g = kl(p, q), [-x / y for x, y in zip(p, q)]
    elif div == "rkl":
        val, g = kl(q, p), [math.log(y / x) + 1 for x, y in zip(p, q)]
    else:
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        val = beta * kl(p, m) + (1 - beta) * kl(q, m)
        g = [(1 - beta) * math.log(y / z) for y, z in zip(q, m)]
    K = len(q_top)
    if tail:
        grad = [q[j] * (g[j] - g[K]) for j in range(K)]
    else:
        mean_g = sum(x * y for x, y in zip(q, g))
        grad = [q[j] * (g[j] - mean_g) for j in range(K)]
    return val, grad


def toy(B=3, R=4, V=11, K=4, seed=0):
    """Teacher and student full log-softmaxes [B, R, V], the teacher's top-K ids, both gathered."""
    g = torch.Generator().manual_seed(seed)
    t_full = (2 * torch.randn(B, R, V, generator=g, dtype=D)).log_softmax(-1)
    s_full = (2 * torch.randn(B, R, V, generator=g, dtype=D)).log_softmax(-1)
    ids = torch.sort(t_full, dim=-1, descending=True, stable=True).indices[..., :K]
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[0, -1] = False
    return t_full, s_full, ids, mask


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("div,beta", DIVS)
def test_value_and_gradient_match_hand_computation(div, beta, tail):
    t_full, s_full, ids, mask = toy()
    T, S = t_full.gather(-1, ids), s_full.gather(-1, ids).requires_grad_()
    d = topk_divergence(S, T, mask, divergence=div, beta=beta, tail=tail)
    (grad,) = torch.autograd.grad(d.sum(), S)
    for b, r in mask.nonzero().tolist():
        val, g = hand(T[b, r].tolist(), S[b, r].tolist(), div, beta, tail)
        assert abs(d[b, r].item() - val) < 1e-12
        torch.testing.assert_close(grad[b, r], torch.tensor(g, dtype=D), rtol=0, atol=1e-12)
    assert d[0, -1] == 0 and grad[0, -1].abs().sum() == 0


def test_gradcheck_through_the_loss():
    t_full, s_full, ids, mask = toy(B=2, R=3, V=7, K=3, seed=1)
    p = LossParams(kind="topk", divergence="jsd", beta=0.3)
    base = dict(logp=s_full.gather(-1, ids[..., :1])[..., 0], teacher_logp=t_full.gather(-1, ids[..., :1])[..., 0],
                mask=mask, **{"teacher_topk_logp.a": t_full.gather(-1, ids), "topk_weight.a": torch.ones(2, dtype=D)})
    fn = lambda x: compute_loss(p, {**base, "topk_logp.a": x.log_softmax(-1).gather(-1, ids)})[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s_full.clone().requires_grad_(),), eps=1e-6, atol=1e-8)


def _full(div, beta, t, s):
    """Exact divergence on the whole vocabulary, [B, R]."""
    p, q = t.exp(), s.exp()
    if div == "fkl":
        return (p * (t - s)).sum(-1)
    if div == "rkl":
        return (q * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), 0)
    return beta * (p * (t - m)).sum(-1) + (1 - beta) * (q * (s - m)).sum(-1)


@pytest.mark.parametrize("tail", [False, True])
@pytest.mark.parametrize("div,beta", DIVS)
def test_k_equal_vocabulary_is_the_exact_divergence(div, beta, tail):
    t_full, s_full, ids, mask = toy(K=11)
    d = topk_divergence(s_full.gather(-1, ids), t_full.gather(-1, ids), mask, divergence=div, beta=beta, tail=tail)
    want = torch.where(mask, _full(div, beta, t_full, s_full), 0.0)
    torch.testing.assert_close(d, want, rtol=0, atol=1e-10)


def test_jsd_limits_are_forward_and_reverse_kl():
    t_full, s_full, ids, mask = toy(K=5, seed=2)
    S, T = s_full.gather(-1, ids), t_full.gather(-1, ids)
    div = lambda name, beta=0.5: topk_divergence(S, T, mask, divergence=name, beta=beta)  # noqa: E731
    eps = 1e-6
    torch.testing.assert_close(div("jsd", eps) / eps, div("fkl"), rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(div("jsd", 1 - eps) / eps, div("rkl"), rtol=1e-4, atol=1e-9)


def _loss(div, teachers, s_logits, mask, weights, tail=False):
    """compute_loss(topk) with the student's log-softmax gathered at each teacher's ids."""
    s = s_logits.log_softmax(-1)
    batch = dict(logp=s[..., 0], teacher_logp=s[..., 0].detach(), mask=mask)
    for n, (t, ids) in teachers.items():
        batch.update({f"teacher_topk_logp.{n}": t.gather(-1, ids), f"topk_logp.{n}": s.gather(-1, ids),
                      f"topk_weight.{n}": torch.full((mask.shape[0],), weights[n], dtype=D)})
    return compute_loss(LossParams(kind="topk", divergence=div, tail=tail), batch)


def test_mixture_fkl_sum_has_the_gradient_of_fkl_to_the_mixture_and_rkl_sum_of_rkl_to_the_product():
    (ta, s_full, ids_a, mask), (tb, _, ids_b, _) = toy(V=9, K=9, seed=3), toy(V=9, K=9, seed=4)
    w = {"a": 0.3, "b": 0.7}
    x = s_full.clone().requires_grad_()
    teachers = {"a": (ta, ids_a), "b": (tb, ids_b)}
    n = mask.sum()
    mix = torch.logsumexp(torch.stack([ta + math.log(0.3), tb + math.log(0.7)]), 0)
    poe = (0.3 * ta + 0.7 * tb).log_softmax(-1)  # the normalized product of experts
    for div, target in (("fkl", mix), ("rkl", poe)):
        (g,) = torch.autograd.grad(_loss(div, teachers, x, mask, w)[0], x)
        exact = torch.where(mask, _full(div, 0.5, target, x.log_softmax(-1)), 0.0).sum() / n
        (g_exact,) = torch.autograd.grad(exact, x)
        torch.testing.assert_close(g, g_exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("div,beta", DIVS[:3])
def test_a_few_steps_lower_the_exact_divergence(div, beta, tail):
    """Toy categorical (V = 16): training on the teacher's top-4 lowers the full-vocabulary divergence."""
    g = torch.Generator().manual_seed(5)
    t = (2.5 * torch.randn(1, 6, 16, generator=g, dtype=D)).log_softmax(-1)
    ids = torch.sort(t, dim=-1, descending=True, stable=True).indices[..., :4]
    x = torch.randn(1, 6, 16, generator=g, dtype=D).requires_grad_()
    mask = torch.ones(1, 6, dtype=torch.bool)
    exact = lambda: _full(div, beta, t, x.log_softmax(-1)).mean().item()  # noqa: E731
    before = exact()
    opt = torch.optim.SGD([x], lr=5.0)
    for _ in range(20):
        opt.zero_grad()
        _loss(div, {"t": (t, ids)}, x, mask, {"t": 1.0}, tail=tail)[0].backward()
        opt.step()
    assert exact() < 0.9 * before


def test_sampled_term_is_added_and_padding_is_ignored():
    t_full, s_full, ids, mask = toy(seed=6)
    S = s_full.gather(-1, ids).requires_grad_()
    logp = s_full[..., 0].clone().requires_grad_()
    batch = dict(logp=logp, teacher_logp=t_full[..., 0], mask=mask, **{"teacher_topk_logp.a": t_full.gather(-1, ids),
                 "topk_logp.a": S, "topk_weight.a": torch.ones(3, dtype=D)})
    p0 = LossParams(kind="topk", tis_cap=None)
    l0, m0 = compute_loss(p0, batch)
    l1, m1 = compute_loss(LossParams(kind="topk", tis_cap=None, sampled_weight=0.5), batch)
    rkl, _ = rkl_loss(logp, t_full[..., 0], mask, params=LossParams(kind="rkl", tis_cap=None))
    assert l1.item() == pytest.approx(l0.item() + 0.5 * rkl.item(), abs=1e-12)
    assert m1["loss_sampled"] == pytest.approx(0.5 * rkl.item()) and m0["loss_sampled"] == 0
    assert 0 < m0["teacher_topk_mass/a"] < 1 and m0["topk_div"] == pytest.approx(m0["topk_div/a"])
    garbage = {k: v.detach().clone() if k != "topk_weight.a" else v for k, v in batch.items()}
    garbage["teacher_topk_logp.a"][0, -1] = float("nan")
    garbage["topk_logp.a"] = torch.where(mask.unsqueeze(-1), S, float("inf"))
    garbage["logp"] = logp
    l2, _ = compute_loss(p0, garbage)
    (g,) = torch.autograd.grad(l2, S)
    assert l2.item() == pytest.approx(l0.item(), abs=1e-12) and g[0, -1].abs().sum() == 0


def test_bad_input_is_named():
    t_full, s_full, ids, mask = toy()
    S, T = s_full.gather(-1, ids), t_full.gather(-1, ids)
    with pytest.raises(ValueError, match="not sorted descending"):
        topk_divergence(S, T.flip(-1), mask)
    T2 = T.clone()
    T2[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="nan/inf"):
        topk_divergence(S, T2, mask)
    with pytest.raises(ValueError, match="loss.beta"):
        LossParams(kind="topk", divergence="jsd", beta=1.0)
    with pytest.raises(ValueError, match="loss.divergence"):
        LossParams(kind="topk", divergence="tvd")
    with pytest.raises(ValueError, match="scoring.top_k"):
        compute_loss(LossParams(kind="topk"), dict(logp=S[..., 0], teacher_logp=T[..., 0], mask=mask))
    with pytest.raises(ValueError, match="lacks"):
        compute_loss(LossParams(kind="topk"), dict(logp=S[..., 0], teacher_logp=T[..., 0], mask=mask,
                                                   **{"teacher_topk_logp.a": T}))
