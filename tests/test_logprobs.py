"""Alignment of the one shift function: token t's log-prob is of token t given its prefix; the chunked
output layer against float64."""
import pytest
import torch

from opd_tasks.logprobs import gather_response, token_logp


class CountingLM(torch.nn.Module):
    """A causal 'model' whose logits at position i depend only on ids[:i+1], so any shift bug shows."""

    def __init__(self, vocab=11, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))
        self.out = torch.nn.Parameter(torch.randn(dim, vocab, generator=g))

    def forward(self, ids):
        h = self.emb[ids].cumsum(1)  # prefix sums: causal by construction
        return h @ self.out


def test_token_logp_is_logprob_of_token_given_prefix():
    torch.manual_seed(0)
    lm = CountingLM()
    ids = torch.randint(0, 11, (3, 7))
    out = token_logp(lm(ids), ids)
    for b in range(3):
        for i in range(1, 7):
            prefix = ids[b:b + 1, :i]
            expected = torch.log_softmax(lm(prefix)[0, -1].float(), -1)[ids[b, i]]
            torch.testing.assert_close(out[b, i], expected, rtol=0, atol=1e-5)
        assert out[b, 0] == 0


def test_temperature_divides_logits():
    lm = CountingLM()
    ids = torch.randint(0, 11, (2, 5))
    logits = lm(ids)
    out = token_logp(logits, ids, temperature=0.5)
    ref = torch.log_softmax(logits[:, :-1] / 0.5, -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(out[:, 1:], ref)


def test_gather_response_padding_sides_agree():
    torch.manual_seed(1)
    lm = CountingLM()
    prompt = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    resp = [torch.tensor([5, 6]), torch.tensor([7, 8, 9, 10])]
    rows = [torch.cat([p, r]) for p, r in zip(prompt, resp)]
    L = max(len(r) for r in rows)
    rlens = torch.tensor([len(r) for r in resp])
    # right padding
    right = torch.stack([torch.nn.functional.pad(r, (0, L - len(r))) for r in rows])
    v_r, m_r = gather_response(token_logp(lm(right), right), torch.tensor([3, 1]), rlens)
    # alone, no padding at all
    alone = [token_logp(lm(r[None]), r[None])[0, len(p):] for p, r in zip(prompt, rows)]
    for b in range(2):
        torch.testing.assert_close(v_r[b, : rlens[b]], alone[b])
        assert m_r[b].sum() == rlens[b]
        assert torch.all(v_r[b, rlens[b]:] == 0)
    # left padding: positions shift by the pad count (CountingLM's prefix sums include pad
    # embeddings, so use pad id with a zero embedding to keep the prefix identical)
    lm.emb.data[0] = 0
    left = torch.stack([torch.nn.functional.pad(r, (L - len(r), 0)) for r in rows])
    start = torch.tensor([L - len(rows[0]) + 3, L - len(rows[1]) + 1])
    v_l, _ = gather_response(token_logp(lm(left), left), start, rlens)
    alone = [token_logp(lm(r[None]), r[None])[0, len(p):] for p, r in zip(prompt, rows)]
    for b in range(2):
        torch.testing.assert_close(v_l[b, : rlens[b]], alone[b])


def test_one_token_response_gets_one_logp():
    lm = CountingLM()
    ids = torch.tensor([[3, 4, 5]])
    v, m = gather_response(token_logp(lm(ids), ids), torch.tensor([2]), torch.tensor([1]))
    assert v.shape == (1, 1) and m.sum() == 1


def _full_logp64(h, w, b, tgt, temperature):
    """The reference: whole [T, V] logits in float64, log_softmax, pick the target."""
    lg = (h.double() @ w.double().t() + (0 if b is None else b.double())) / temperature
    return torch.log_softmax(lg, -1).gather(-1, tgt.unsqueeze(-1)).squeeze(-1)



@pytest.mark.parametrize("temperature, bias, chunk", [(1.0, False, 7), (0.7, True, 4), (1.0, True, 1000)])
def test_chunked_token_logp_values_and_gradients_match_float64(temperature, bias, chunk):
    from opd_tasks.logprobs import chunked_token_logp
    g = torch.Generator().manual_seed(1)
    T, H, V = 23, 16, 97  # T not a multiple of the chunk: a short last chunk
    h = torch.randn(T, H, generator=g, requires_grad=True)
    w = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    b = torch.randn(V, generator=g).requires_grad_() if bias else None
    tgt = torch.randint(0, V, (T,), generator=g)
    up = torch.randn(T, generator=g)  # an upstream gradient that is not all ones
    got = chunked_token_logp(h, w, tgt, b, temperature=temperature, chunk=chunk)
    assert got.dtype == torch.float32 and got.shape == (T,)
    grads = torch.autograd.grad((got * up).sum(), [x for x in (h, w, b) if x is not None])
    leaves = [x.detach().double().requires_grad_() for x in (h, w, b) if x is not None]
    want = _full_logp64(leaves[0], leaves[1], leaves[2] if bias else None, tgt, temperature)
    want_grads = torch.autograd.grad((want * up.double()).sum(), leaves)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), e, rtol=0, atol=1e-5)
    assert max(float(x.abs().max()) for x in want_grads) > 0.1  # the gradients are not trivially zero


def test_chunked_token_logp_bf16_matches_the_full_upcast_path():
    """bf16 weights: same as bf16 matmul -> float32 -> log-softmax (the full path's arithmetic)."""
    from opd_tasks.logprobs import chunked_token_logp
    g = torch.Generator().manual_seed(2)
    h = torch.randn(19, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(50, 16, generator=g).bfloat16().requires_grad_()
    tgt = torch.randint(0, 50, (19,), generator=g)
    got = chunked_token_logp(h, w, tgt, chunk=5)
    full = torch.nn.functional.linear(h, w).float()
    want = full.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(full, -1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    ga = torch.autograd.grad(got.sum(), [h, w])
    gb = torch.autograd.grad(want.sum(), [h, w])
    for a, e in zip(ga, gb):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), e.float(), rtol=1e-2, atol=2e-2)  # bf16 rounding of the sums


def test_response_positions_point_at_the_logits_that_predict_each_response_token():
    from opd_tasks.logprobs import response_positions
    # row 0: prompt of 2, response of 3 (L = 6: one pad); row 1: prompt 4, response 1
    start, rlen = torch.tensor([2, 4]), torch.tensor([3, 1])
    pred, mask = response_positions(start, rlen, 6)
    assert pred.tolist() == [1, 2, 3, 6 + 3]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    # the same log-probs as token_logp + gather_response on a CountingLM
    lm = CountingLM()
    ids = torch.randint(0, 11, (2, 6))
    logits = lm(ids)
    want, _ = gather_response(token_logp(logits, ids), start, rlen)
    flat = logits.reshape(-1, 11)[pred]
    got = torch.log_softmax(flat, -1).gather(-1, ids.reshape(-1)[pred + 1].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.zeros(2, 3).masked_scatter(mask, got), want, rtol=0, atol=1e-6)
