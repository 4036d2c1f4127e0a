"""The sft loss against float64 math written out per token: value, gradient w.r.t. logp, both
aggregations, the normalizer contract (micro-batch losses sum to the mini-batch loss), padding."""
import math

import pytest
import torch

from opd_tasks.losses import LossParams, compute_loss, sft_loss

D = torch.float64


def reference(s, m, aggregation, normalizer=None):
    """(loss, d loss / d s) of L = sum_i sum_t m * (-s) / N (token_mean) or
    sum_i (sum_t m * (-s) / len_i) / N (seq_mean); python floats."""
    s, m = s.tolist(), m.tolist()
    n_tok = sum(sum(1 for v in row if v) for row in m)
    loss, grad = 0.0, [[0.0] * len(s[0]) for _ in s]
    for i, row in enumerate(s):
        n_seq = sum(1 for v in m[i] if v)
        coef = (1.0 / (normalizer or n_tok) if aggregation == "token_mean"
                else 1.0 / (max(n_seq, 1) * (normalizer or len(s))))
        for t, v in enumerate(row):
            if m[i][t]:
                loss += -v * coef
                grad[i][t] = -coef
    return loss, grad


def _batch(seed=0, B=3, R=5):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(B, R, generator=g, dtype=D) * 3
    lens = torch.tensor([5, 2, 3])[:B]
    m = torch.arange(R).unsqueeze(0) < lens.unsqueeze(1)
    return s, m


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
@pytest.mark.parametrize("normalizer", [None, 7.0])
def test_value_and_gradient_match_float64_by_hand(aggregation, normalizer):
    s, m = _batch()
    s = s.clone().requires_grad_(True)
    loss, metrics = sft_loss(s, m, params=LossParams(kind="sft", aggregation=aggregation), normalizer=normalizer)
    loss.backward()
    want, grad = reference(s.detach(), m, aggregation, normalizer)
    assert loss.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(s.grad, torch.tensor(grad, dtype=D), rtol=1e-12, atol=1e-15)
    valid = s.detach()[m]
    assert metrics["nll"] == pytest.approx(float(-valid.mean()), rel=1e-12)
    assert metrics["tokens"] == 10 and metrics["sequences"] == 3


def test_hand_numbers():
    """Two responses: [-1, -2] and [-4]: token mean 7/3, sequence mean (1.5 + 4) / 2 = 2.75."""
    s = torch.tensor([[-1.0, -2.0], [-4.0, 0.0]], dtype=D)
    m = torch.tensor([[True, True], [True, False]])
    assert sft_loss(s, m)[0].item() == pytest.approx(7 / 3)
    assert sft_loss(s, m, params=LossParams(kind="sft", aggregation="seq_mean"))[0].item() == pytest.approx(2.75)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batches_sum_to_the_mini_batch_loss(aggregation):
    s, m = _batch(seed=3)
    p = LossParams(kind="sft", aggregation=aggregation)
    whole = sft_loss(s, m, params=p)[0]
    norm = float(m.sum()) if aggregation == "token_mean" else float(m.shape[0])
    parts = sum(sft_loss(s[i:i + 1], m[i:i + 1], params=p, normalizer=norm)[0] for i in range(3))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)


def test_padding_may_hold_nan_and_gets_zero_gradient():
    s, m = _batch()
    s = torch.where(m, s, torch.full_like(s, math.nan)).requires_grad_(True)
    loss, _ = sft_loss(s, m)
    loss.backward()
    assert math.isfinite(loss.item())
    assert (s.grad[~m] == 0).all() and (s.grad[m] != 0).all()


def test_compute_loss_dispatches_sft_without_teacher_and_reports_teacher_nll_with_one():
    s, m = _batch()
    p = LossParams(kind="sft")
    loss, metrics = compute_loss(p, {"logp": s, "mask": m})
    assert loss.item() == pytest.approx(reference(s, m, "token_mean")[0], rel=1e-12)
    assert "teacher_nll" not in metrics
    T = s - 0.5
    _, metrics = compute_loss(p, {"logp": s, "mask": m, "teacher_logp": T, "rewards": torch.ones(3)})
    assert metrics["teacher_nll"] == pytest.approx(float(-T[m].mean()), rel=1e-12)
    with pytest.raises(ValueError, match="lacks.*mask"):
        compute_loss(p, {"logp": s})


def test_sft_lowers_the_nll_of_the_data():
    """A few gradient steps on free logits raise the likelihood of the target tokens."""
    torch.manual_seed(0)
    logits = torch.zeros(2, 4, 6, requires_grad=True)
    target = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    opt = torch.optim.SGD([logits], lr=5.0)
    losses = []
    for _ in range(20):
        s = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss, _ = sft_loss(s, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(6)) and losses[-1] < 0.5 * losses[0]
