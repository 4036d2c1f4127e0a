"""The one place where logits become per-token log-probs of the tokens that were there.

Every forward pass in opd (teacher/reference scoring, the trainer's old_t and s_t, the hf
rollout's behaviour log-probs) goes through these two functions, so the shift from "logits at
position i" to "log-prob of token i+1" is written exactly once.

Layout: a row is prompt_ids + response_ids (+ padding on either side). Response token j of
row b sits at index start[b] + j, where start[b] = left_pad[b] + len(prompt_ids[b]).
"""
from __future__ import annotations

import torch

# the torch dtype of each config dtype name (config.Dtype): model loads, engines, the HF export
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def token_logp(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of each token given the tokens before it.

    logits: [B, L, V] (any float dtype; computed in float32), input_ids: [B, L] int.
    Returns [B, L] float32: out[b, i] = log softmax(logits[b, i-1] / temperature)[input_ids[b, i]]
    for i >= 1, and out[b, 0] = 0 (the first token has no prediction).
    Uses logit - logsumexp instead of a full log_softmax to avoid a second [B, L, V] tensor.
    """
    lg = logits[:, :-1].float()
    if temperature != 1.0:
        lg = lg / temperature
    tgt = input_ids[:, 1:].long().unsqueeze(-1)
    logp = lg.gather(-1, tgt).squeeze(-1) - torch.logsumexp(lg, dim=-1)
    return torch.nn.functional.pad(logp, (1, 0))


def gather_response(per_token: torch.Tensor, start: torch.Tensor, response_lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut each row's response span out of a [B, L] per-token tensor.

    per_token: [B, L]; start: [B] index of response token 0 in each row (>= 1: a response always
    follows at least one prompt token); response_lens: [B].
    Returns (values [B, R] with R = max(response_lens), mask [B, R] bool); padded entries are 0.
    """
    B, L = per_token.shape
    R = int(response_lens.max()) if B else 0
    j = torch.arange(R, device=per_token.device)
    mask = j.unsqueeze(0) < response_lens.unsqueeze(1)
    idx = (start.unsqueeze(1) + j.unsqueeze(0)).clamp(max=L - 1)
    values = per_token.gather(1, idx) * mask
    return values, mask


def response_positions(start: torch.Tensor, response_lens: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the response tokens of a [B, L] batch are, flattened row-major.

    Returns (pred [T], mask [B, R]): pred[t] = b * L + start[b] + j - 1 is the position whose
    logits predict response token j of row b (its id sits at pred[t] + 1), for every valid (b, j)
    in mask order (row-major: mask.nonzero()); T = response_lens.sum().
    """
    R = int(response_lens.max()) if len(response_lens) else 0
    j = torch.arange(R, device=start.device)
    mask = j.unsqueeze(0) < response_lens.unsqueeze(1)
    rows = torch.arange(len(start), device=start.device).unsqueeze(1)
    pred = (rows * length + start.unsqueeze(1) + j.unsqueeze(0) - 1)[mask]
    return pred, mask


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  temperature: float) -> torch.Tensor:
    """[c, V] float32 logits of a chunk, computed like the full path: matmul in the model's dtype, then upcast."""
    lg = torch.nn.functional.linear(hidden, weight, bias).float()
    return lg / temperature if temperature != 1.0 else lg


class _ChunkedLogp(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[target] chunk by chunk: only [chunk, V] float32 exists at a time.

    Saves hidden [T, H] and the per-token logsumexp [T]; backward recomputes each chunk's logits:
    d logp_t / d logits_t = onehot(target_t) - softmax_t (divided by the temperature).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int, temperature: float):
        T = hidden.shape[0]
        out = torch.empty(T, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(T, dtype=torch.float32, device=hidden.device)
        for s in range(0, T, chunk):
            lg = _chunk_logits(hidden[s:s + chunk], weight, bias, temperature)
            lse[s:s + chunk] = torch.logsumexp(lg, dim=-1)
            out[s:s + chunk] = lg.gather(-1, targets[s:s + chunk].unsqueeze(-1)).squeeze(-1) - lse[s:s + chunk]
            del lg
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.temperature = chunk, temperature
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk, temperature = ctx.chunk, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        grad_out = grad_out.float()
        for s in range(0, hidden.shape[0], chunk):
            h, g = hidden[s:s + chunk], grad_out[s:s + chunk].unsqueeze(-1)
            p = _chunk_logits(h, weight, bias, temperature).sub_(lse[s:s + chunk].unsqueeze(-1)).exp_()
            grad_lg = p.mul_(-g).scatter_add_(-1, targets[s:s + chunk].unsqueeze(-1), g)  # g * (onehot - softmax)
            if temperature != 1.0:
                grad_lg.div_(temperature)
            if need_b:
                grad_b += grad_lg.sum(0)
            grad_lg = grad_lg.to(weight.dtype)  # the full path's upcast backward casts here too
            if need_h:
                grad_h[s:s + chunk] = grad_lg @ weight
            if need_w:
                grad_w += (grad_lg.t() @ h).float()
            del p, grad_lg
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def chunked_token_logp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                       bias: torch.Tensor | None = None, temperature: float = 1.0, chunk: int = 1024) -> torch.Tensor:
    """token_logp for selected positions without the [T, V] float32 tensor, forward or backward.

    hidden: [T, H] final hidden states of the positions that predict `targets` [T] int;
    weight: [V, H] (and bias [V]) of the output layer. Returns [T] float32
    log softmax(hidden @ weight.T + bias)[targets] / temperature, equal to the full computation up to
    float rounding; differentiable in hidden, weight and bias. At most [chunk, V] float32 logits
    (and one softmax of that size in backward) exist at a time.
    """
    if chunk < 1:
        raise ValueError(f"chunked_token_logp: chunk must be >= 1, got {chunk}")
    return _ChunkedLogp.apply(hidden, weight, bias, targets.long(), int(chunk), float(temperature))


def topk_logp(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of each row: logits [M, V] -> (ids [M, k] int64, log-probs [M, k]
    float32), largest first, ties broken by the smaller token id (deterministic on every device).
    Log-probs are logit - logsumexp in float32, the arithmetic of token_logp, so a token's value
    here equals its token_logp value bit for bit.

    torch.topk (O(V) per row), then its k candidates ordered by (-value, id); a row with a tie AT
    the k-th value (more than k tokens >= it, where topk's pick would be arbitrary) takes a stable
    full sort instead."""
    if logits.dim() != 2 or not 0 < k <= logits.shape[-1]:
        raise ValueError(f"top-k: need logits [M, V] and k in 1..V={logits.shape[-1]}, got shape "
                         f"{tuple(logits.shape)} and k={k}; fix scoring.top_k")
    lg = logits.float()
    lsm = lg - torch.logsumexp(lg, dim=-1, keepdim=True)
    vals, ids = lsm.topk(k, dim=-1)
    ids, order = ids.sort(dim=-1)  # by id, then stable by value: ties inside the k go to the smaller id
    vals = vals.gather(-1, order)
    vals, order = vals.sort(dim=-1, descending=True, stable=True)
    ids = ids.gather(-1, order)
    tied = (lsm >= vals[:, -1:]).sum(-1) > k
    if bool(tied.any()):
        full_v, full_i = torch.sort(lsm[tied], dim=-1, descending=True, stable=True)
        vals[tied], ids[tied] = full_v[:, :k], full_i[:, :k]
    return ids, vals


def gather_logp(logits: torch.Tensor, start: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The student's log-probs at given token ids of each response position (top-k distillation).

    logits: [B, L, V] (with grad), start: [B] index of response token 0, ids: [B, R, K] int.
    Returns [B, R, K] float32: log softmax(logits[b, start[b] - 1 + j])[ids[b, j, k]]; positions
    past a row's end read a clamped position (mask them).
    """
    B, L, _ = logits.shape
    R = ids.shape[1]
    pos = (start.unsqueeze(1) - 1 + torch.arange(R, device=logits.device)).clamp(0, L - 1)  # [B, R]
    lg = logits.gather(1, pos.unsqueeze(-1).expand(B, R, logits.shape[-1])).float()  # [B, R, V]
    return lg.gather(-1, ids.long()) - torch.logsumexp(lg, dim=-1, keepdim=True)
