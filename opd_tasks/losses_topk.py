"""Top-k distribution distillation (loss.kind: topk), pure torch; docs/algorithms.md, "Top-k distillation".

At every valid response position t, teacher n stored its K most likely token ids i_1..i_K
(scoring.top_k) and their log-probs log p(i_k), sorted descending. The student's log-probs at
the SAME ids, log q(i_k), are gathered from its full log-softmax (opd_tasks.logprobs.topk_logp),
so both sides are the distributions' values on one partition of the vocabulary:

    tail=True:  K + 1 buckets: the K ids and "every other token", whose mass is
                p_tail = 1 - sum_k p(i_k) and q_tail = 1 - sum_k q(i_k) on each side: exact
                distributions, and with K = vocabulary size exactly the full ones.
    tail=False: the K ids only, each side renormalized over them (p / sum_k p, q / sum_k q): the
                student is not pushed to move mass into or out of the teacher's top-k.

    fkl: KL(p || q) = sum_b p_b (log p_b - log q_b)                  (mode covering)
    rkl: KL(q || p) = sum_b q_b (log q_b - log p_b)                  (mode seeking)
    jsd: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, 0 < beta < 1;
         jsd / beta -> fkl as beta -> 0, jsd / (1 - beta) -> rkl as beta -> 1.

rkl here is over the TEACHER's top-k ids with the teacher's values: a reverse KL over the
student's own top-k would need teacher values at ids the teacher did not store (and without
them collapses mass), so it is not offered.

Math in float64 (the [B, R, K] tensors are small), result in the student's dtype. The tail's
log(1 - sum) is floored at log(TAIL_FLOOR): with K = vocabulary size it is 0 up to rounding.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

import torch

from opd_tasks.losses import LossParams, _aggregate, _inputs, rkl_loss

Tensor = torch.Tensor
DIVERGENCES = ("fkl", "rkl", "jsd")
TAIL_FLOOR = 1e-12
_SLACK = 1e-3  # log-probs above this are not log-probs (logits stored?); as storage.columns.LOGP_TOLERANCE


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - exp(a)) for a <= 0, accurate near 0 and very negative a (Maechler 2012); a is
    clamped to <= log(1 - TAIL_FLOOR) so the result is finite, and so is its gradient."""
    a = a.clamp(max=math.log1p(-TAIL_FLOOR))
    return torch.where(a > -math.log(2), torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(a)))


def buckets(logp: Tensor, tail: bool) -> Tensor:
    """[..., K] log-probs at the top-k ids -> [..., K(+1)] log-probs of the buckets (see module doc)."""
    lse = torch.logsumexp(logp, dim=-1, keepdim=True)
    if tail:
        return torch.cat([logp, log1mexp(lse)], dim=-1)
    return logp - lse


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """sum_b a_b (log a_b - log b_b) over the last dim (a_b = 0 terms are 0)."""
    a = logp_a.exp()
    return torch.where(a > 0, a * (logp_a - logp_b), 0.0).sum(-1)


def check_topk(teacher_topk_logp: Tensor, mask: Tensor, name: str = "teacher_topk_logp") -> None:
    """ValueError unless teacher_topk_logp [B, R, K] is finite, <= 0 and sorted descending along K
    at valid positions (mask [B, R])."""
    if teacher_topk_logp.dim() != 3 or teacher_topk_logp.shape[:2] != mask.shape:
        raise ValueError(f"{name} must be [B, R, K] with [B, R] = mask's {tuple(mask.shape)}, got "
                         f"{tuple(teacher_topk_logp.shape)}")
    x = teacher_topk_logp.detach()[mask]  # [M, K]
    if x.numel() == 0:
        return
    if not bool(torch.isfinite(x).all()) or bool((x > _SLACK).any()):
        raise ValueError(f"{name} holds nan/inf or positive values at valid tokens; re-score with scoring.top_k "
                         f"(the stored top-k log-probs are not log-probs)")
    if x.shape[-1] > 1 and bool((x[:, 1:] > x[:, :-1]).any()):
        raise ValueError(f"{name} is not sorted descending along K at some valid token; the scorer must store "
                         f"the top-k largest first (storage validates this on write)")


def topk_divergence(student_topk_logp: Tensor, teacher_topk_logp: Tensor, mask: Tensor, *,
                    divergence: str = "fkl", beta: float = 0.5, tail: bool = True) -> Tensor:
    """Per-token divergence between teacher and student on the teacher's top-k buckets.

    student_topk_logp: [B, R, K] log q at the teacher's ids (with grad); teacher_topk_logp: [B, R, K]
    log p, sorted descending; mask: [B, R] bool. Returns [B, R] in the student's dtype, exactly 0
    (and zero gradient) at padding, whatever padding holds.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"loss.divergence: {divergence!r} is not one of {list(DIVERGENCES)}")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"loss.beta: jsd needs 0 < beta < 1, got {beta}; beta -> 0 is fkl, beta -> 1 is rkl "
                         f"(use those divergences for the end points)")
    m = mask if mask.dtype == torch.bool else mask != 0
    if student_topk_logp.shape != teacher_topk_logp.shape:
        raise ValueError(f"student top-k log-probs {tuple(student_topk_logp.shape)} and teacher "
                         f"{tuple(teacher_topk_logp.shape)} differ; gather the student at the teacher's ids")
    check_topk(teacher_topk_logp, m)
    keep = m.unsqueeze(-1)
    pad = -math.log(student_topk_logp.shape[-1] + 1)  # padding -> uniform 1/(K+1): no nan/inf in the graph
    q = buckets(torch.where(keep, student_topk_logp.double(), pad), tail)
    p = buckets(torch.where(keep, teacher_topk_logp.detach().double(), pad), tail)
    if divergence == "fkl":
        d = _kl(p, q)
    elif divergence == "rkl":
        d = _kl(q, p)
    else:
        lb, l1b = math.log(beta), math.log1p(-beta)
        mix = torch.logsumexp(torch.stack([p + lb, q + l1b]), dim=0)
        d = beta * _kl(p, mix) + (1 - beta) * _kl(q, mix)
    return torch.where(m, d, 0.0).to(student_topk_logp.dtype)


def topk_mass(topk_logp: Tensor, mask: Tensor) -> Tensor:
    """Token mean of sum_k exp(logp_k) over valid tokens: how much mass the top-k ids hold (metrics)."""
    m = mask if mask.dtype == torch.bool else mask != 0
    s = torch.where(m, topk_logp.detach().double().exp().sum(-1), 0.0)
    return s.sum() / m.sum().clamp(min=1)


TOPK_IDS, TOPK_LOGP, STUDENT, WEIGHT = "teacher_topk_ids.", "teacher_topk_logp.", "topk_logp.", "topk_weight."


def topk_loss(params: LossParams, batch: dict[str, Tensor],
              normalizer: Optional[float] = None) -> tuple[Tensor, dict[str, float]]:
    """loss = aggregate_t( sum_n w_n[b] D(p_n,t || q_t) ) + sampled_weight * rkl_loss (the sampled-token term).

    batch, per teacher NAME taking part: teacher_topk_logp.NAME [B, R, K] (stored, sorted),
    topk_logp.NAME [B, R, K] (the student's log-probs at teacher NAME's ids, with grad), and
    topk_weight.NAME [B] (route: 1 for the row's teacher, else 0; mixture: the normalized weight;
    opd_tasks.combine.topk_row_weights). Plus rkl_loss's logp, teacher_logp, mask, old_logp,
    behaviour_logp and teacher_logp.NAME (metrics). The divergence term has no ratio, clip or TIS:
    it is the exact divergence at each visited position, differentiated directly.
    Metrics: rkl_loss's (KL estimates of the sampled tokens), loss (the total), loss_topk,
    loss_sampled, topk_div (token mean of the weighted divergence), and per teacher
    topk_div/NAME, teacher_topk_mass/NAME and student_topk_mass/NAME (mass on the top-k ids).
    """
    p = params
    names = sorted(k[len(TOPK_LOGP):] for k in batch if k.startswith(TOPK_LOGP))
    if not names:
        raise ValueError("loss.kind=topk: the batch has no teacher_topk_logp.NAME; score with scoring.top_k > 0")
    missing = [k + n for n in names for k in (STUDENT, WEIGHT) if k + n not in batch]
    if missing:
        raise ValueError(f"loss.kind=topk: the batch lacks {missing} (the student's log-probs at the teacher's "
                         f"top-k ids, and each row's teacher weight)")
    m, _ = _inputs(batch["mask"], logp=batch["logp"])
    per_token = torch.zeros(m.shape, dtype=batch["logp"].dtype, device=m.device)
    extra: dict[str, Tensor] = {}
    denom = m.sum().clamp(min=1)
    for n in names:
        w = batch[WEIGHT + n].to(per_token.dtype)
        if w.shape != (m.shape[0],) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError(f"topk_weight.{n} must be [B] finite and >= 0, got shape {tuple(w.shape)}")
        d = topk_divergence(batch[STUDENT + n], batch[TOPK_LOGP + n], m, divergence=p.divergence, beta=p.beta,
                            tail=p.tail)
        per_token = per_token + w.unsqueeze(1) * d
        sel = m & (w > 0).unsqueeze(1)  # the rows this teacher teaches
        cnt = sel.sum().clamp(min=1)
        extra[f"topk_div/{n}"] = torch.where(sel, d.detach(), 0.0).sum() / cnt
        extra[f"teacher_topk_mass/{n}"] = topk_mass(batch[TOPK_LOGP + n], sel)
        extra[f"student_topk_mass/{n}"] = topk_mass(batch[STUDENT + n], sel)
    loss_topk = _aggregate(per_token, m, p.aggregation, normalizer)
    sampled = replace(p, kind="rkl", tis_cap=p.tis_cap if p.sampled_weight > 0 else None)
    loss_s, metrics = rkl_loss(batch["logp"], batch["teacher_logp"], batch["mask"], old_logp=batch.get("old_logp"),
                               behaviour_logp=batch.get("behaviour_logp"), params=sampled, normalizer=normalizer,
                               teacher_logps={k.split(".", 1)[1]: v for k, v in batch.items()
                                              if k.startswith("teacher_logp.")} or None)
    loss = loss_topk + p.sampled_weight * loss_s if p.sampled_weight > 0 else loss_topk
    extra.update(loss=loss.detach(), loss_topk=loss_topk.detach(), loss_sampled=p.sampled_weight * loss_s.detach(),
                 topk_div=per_token.detach().sum() / denom)
    floats = torch.stack([v.detach().double().reshape(()) for v in extra.values()]).tolist()  # one sync
    metrics.update(zip(extra, floats))
    return loss, metrics
