"""The one place where logits become per-token log-probs of the tokens that were there.

Every forward pass in opd (teacher/reference scoring, the trainer's old_t and s_t, the hf
rollout's behaviour log-probs) goes through these two functions, so the shift from "logits at
position i" to "log-prob of token i+1" is written exactly once.

Layout: a row is prompt_ids + response_ids (+ padding on either side). Response token j of
row b sits at index start[b] + j, where start[b] = left_pad[b] + len(prompt_ids[b]).
"""
from __future__ import annotations

import torch


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
