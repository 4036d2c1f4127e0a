"""The losses of on-policy distillation, pure torch: rkl, gopd (G-OPD / ExOPD), kdrl (GRPO + KD),
sft (negative log-likelihood of given responses: the offline warm start) and topk (divergences on
the teachers' stored top-k distributions: opd_tasks.losses_topk).

Each loss returns `(loss, metrics)`: a scalar to MINIMIZE and a dict of python floats. The math
and its notation (s_t, old_t, b_t, T_t, R_t, m_t) are those of docs/algorithms.md.

Sign conventions. A per-token reward r_t is "good for the student when high": for rkl
r_t = T_t - sg(s_t), the teacher liking the sampled token more than the student does. It plays
the role of the PPO advantage, A_t = r_t (or its discounted sum G_t), in the clipped surrogate
`loss_t = -min(rho_t A_t, clip(rho_t) A_t)`, rho_t = exp(s_t - old_t). The G-OPD paper writes
its advantage as A_t = (s_t - T_t) + (lambda - 1)(R_t - T_t), which is -r_t: the same update
with the sign of a loss.

Why no "k1" KD loss `mean(s_t - T_t)`: its gradient is grad s_t, whose expectation on
on-policy samples is sum_y pi(y) grad log pi(y) = grad sum_y pi(y) = 0, so it carries no
distillation signal (T_t does not even enter the gradient). k1 appears here only as a
metric and, detached, as a reward (kd_estimator="reward"). On-policy (rho = 1) the k2, pg and
reward estimators give the same per-sample gradient (s_t - T_t) grad s_t, an unbiased estimate
of grad KL(pi_theta || pi_T). k3 used as a loss does not: its expected gradient is
grad KL(pi_T || pi_theta), the forward KL (tests/test_losses.py checks both).

Gradient accumulation: every loss takes `normalizer`, the denominator of the WHOLE mini-batch
(global valid tokens for token_mean, global sequences for seq_mean), so that the sum of the
micro-batch losses equals the mini-batch loss. Metrics are means over this call's valid
tokens (sequence-level ones over its sequences) with "tokens" and "sequences" counts for
weight-averaging; "loss" is this call's share and sums; "*_max" metrics combine by max.

Padding: every input is read through the mask (torch.where), so padded positions may hold
anything, even nan, and still get exactly zero gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor
_KINDS = ("rkl", "gopd", "kdrl", "sft", "topk")
_DIVERGENCES = ("fkl", "rkl", "jsd")
_AGGREGATIONS = ("token_mean", "seq_mean")
_ESTIMATORS = ("k2", "pg", "k3", "reward")


@dataclass(frozen=True)
class LossParams:
    """One loss; fields mirror opd_tasks.config.LossConfig (w_kd already annealed, see annealed_w_kd)."""
    kind: str = "rkl"                    # rkl | gopd | kdrl | sft | topk
    lam: float = 1.0                     # gopd: reward scale lambda; 1 = rkl, > 1 = ExOPD
    discount: float = 0.0                # gamma of the discounted future reward (rkl, gopd, kdrl pg); 0 = own token
    clip_eps_low: Optional[float] = 0.2  # PPO: rho clipped below at 1 - eps (None: no lower clip)
    clip_eps_high: Optional[float] = 0.2  # PPO: rho clipped above at 1 + eps (None: no upper clip)
    tis_cap: Optional[float] = 2.0       # truncated IS: each token's loss times min(exp(old - b), cap) (None: off)
    aggregation: str = "token_mean"      # token_mean | seq_mean
    w_rl: float = 1.0                    # kdrl: weight of the GRPO term (0: pure KD)
    w_kd: float = 0.005                  # kdrl: weight of the KD term
    kd_estimator: str = "k2"             # kdrl: k2 | pg | k3 | reward
    kd_only_incorrect: bool = False      # kdrl: KD only on responses whose verifier reward < 1
    divergence: str = "fkl"              # topk: fkl | rkl | jsd on the teacher's top-k buckets
    beta: float = 0.5                    # topk jsd: mixture weight of the teacher, 0 < beta < 1
    tail: bool = True                    # topk: a bucket for the mass outside the top-k (else renormalize)
    sampled_weight: float = 0.0          # topk: + this x the rkl sampled-token loss (clip, TIS as rkl)

    def __post_init__(self) -> None:
        for field, value, allowed in (("kind", self.kind, _KINDS), ("aggregation", self.aggregation, _AGGREGATIONS),
                                      ("kd_estimator", self.kd_estimator, _ESTIMATORS),
                                      ("divergence", self.divergence, _DIVERGENCES)):
            if value not in allowed:
                raise ValueError(f"loss.{field}: {value!r} is not one of {list(allowed)}")
        checks = (("lam", self.lam > 0, "> 0"), ("discount", 0 <= self.discount <= 1, "in [0, 1]"),
                  ("clip_eps_low", self.clip_eps_low is None or 0 <= self.clip_eps_low <= 1, "in [0, 1] or None"),
                  ("clip_eps_high", self.clip_eps_high is None or self.clip_eps_high >= 0, ">= 0 or None"),
                  ("tis_cap", self.tis_cap is None or self.tis_cap > 0, "> 0 or None"),
                  ("w_rl", self.w_rl >= 0, ">= 0"), ("w_kd", self.w_kd >= 0, ">= 0"),
                  ("beta", 0 < self.beta < 1, "in (0, 1) (beta -> 0 is fkl, -> 1 is rkl)"),
                  ("sampled_weight", self.sampled_weight >= 0, ">= 0"))
        for field, ok, want in checks:
            value = getattr(self, field)
            if not ok or (isinstance(value, float) and not math.isfinite(value)):
                raise ValueError(f"loss.{field}: must be {want}, got {value!r}")


def annealed_w_kd(w_kd: float, w_kd_end: Optional[float], iteration: int, num_iterations: int) -> float:
    """w_kd moved linearly from w_kd (iteration 0) to w_kd_end (iteration num_iterations - 1),
    constant after; w_kd_end None (or a single iteration) keeps w_kd."""
    if iteration < 0:
        raise ValueError(f"annealed_w_kd: iteration must be >= 0, got {iteration}")
    if w_kd_end is None or num_iterations <= 1:
        return float(w_kd)
    frac = min(iteration / (num_iterations - 1), 1.0)
    return float(w_kd + (w_kd_end - w_kd) * frac)


def group_advantages(rewards: Tensor, group_ids: Tensor, eps: float = 1e-6) -> Tensor:
    """GRPO sequence advantages A_i = (r_i - mean_g) / (std_g + eps) over each group g of samples.

    rewards: [N] float, group_ids: [N] int (any values; samples of one prompt share one).
    Returns [N] in the dtype of rewards (computed in float64).
    std_g is the SAMPLE std (divisor G - 1), as torch.std in the GRPO implementations the
    seed weights were tuned with (TRL, verl), so w_rl : w_kd keeps its meaning; the population
    std would scale every advantage by sqrt(G / (G - 1)). A group whose rewards are all equal
    (including a group of one sample) gives exactly 0: it carries no preference.
    """
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"group_advantages: rewards and group_ids must both be [N], got "
                         f"{tuple(rewards.shape)} and {tuple(group_ids.shape)}")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("group_advantages: rewards hold nan/inf; the verifier must give a finite reward per sample")
    r = rewards.double()
    _, g = torch.unique(group_ids, return_inverse=True)
    k = int(g.max()) + 1 if g.numel() else 0
    count = torch.zeros(k, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, g, r) / count
    sq = torch.zeros_like(count).index_add_(0, g, (r - mean[g]) ** 2)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    lo = torch.full_like(count, math.inf).scatter_reduce_(0, g, r, "amin")
    hi = torch.full_like(count, -math.inf).scatter_reduce_(0, g, r, "amax")
    adv = (r - mean[g]) / (std[g] + eps)
    return torch.where((lo == hi)[g], 0.0, adv).to(rewards.dtype)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum over valid k >= t of gamma^(k - t) r_k, within each row.

    rewards: [B, R] (no grad needed), mask: [B, R] bool. Returns [B, R], 0 at padding;
    gamma = 0 gives r_t itself.
    """
    r = torch.where(mask, rewards, 0.0)
    if gamma == 0:
        return r
    out, acc = torch.empty_like(r), torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        acc = r[:, t] + gamma * acc
        out[:, t] = acc
    return torch.where(mask, out, 0.0)


# ---- shared pieces ------------------------------------------------------------------------------

def _inputs(mask: Tensor, **tensors: Optional[Tensor]) -> tuple[Tensor, dict[str, Optional[Tensor]]]:
    """Check shapes and finiteness at valid tokens; return (mask as bool, tensors with padding zeroed)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, R], got shape {tuple(mask.shape)}")
    m = mask if mask.dtype == torch.bool else mask != 0
    given = {k: v for k, v in tensors.items() if v is not None}
    for name, x in given.items():
        if x.shape != m.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but mask has {tuple(m.shape)}; "
                             f"all per-token tensors must be [B, R] in response-token indexing")
    if given:
        bad = torch.stack([(~torch.isfinite(x.detach()) & m).sum() for x in given.values()]).tolist()
        for name, n in zip(given, bad):
            if n:
                raise ValueError(f"{name} holds {n} nan/inf value(s) at valid (masked-in) tokens; "
                                 f"check the shard column {name} or the model that produced it")
    return m, {k: None if v is None else torch.where(m, v, 0.0) for k, v in tensors.items()}


def _per_seq(name: str, x: Optional[Tensor], batch: int) -> Optional[Tensor]:
    if x is None:
        return None
    if x.shape != (batch,):
        raise ValueError(f"{name} must be [B] = [{batch}], got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds nan/inf; every sample needs a finite {name}")
    return x


def _aggregate(per_token: Tensor, m: Tensor, aggregation: str, normalizer: Optional[float]) -> Tensor:
    """per_token: [B, R], already 0 at padding -> scalar.
    token_mean: sum / normalizer (default this call's valid tokens);
    seq_mean: sum_b (sum_t per_token / len_b) / normalizer (default B)."""
    if normalizer is not None and not normalizer > 0:
        raise ValueError(f"normalizer must be > 0 (global tokens or sequences of the mini-batch), got {normalizer}")
    if aggregation == "token_mean":
        denom = normalizer if normalizer is not None else m.sum().clamp(min=1).to(per_token.dtype)
        return per_token.sum() / denom
    lens = m.sum(-1).clamp(min=1).to(per_token.dtype)
    denom = normalizer if normalizer is not None else max(m.shape[0], 1)
    return (per_token.sum(-1) / lens).sum() / denom


def _surrogate(ratio: Tensor, adv: Tensor, p: LossParams) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate per token, -min(rho A, clip(rho) A), and the tokens whose gradient the clip zeroes."""
    unclipped = -ratio * adv
    if p.clip_eps_low is None and p.clip_eps_high is None:
        return unclipped, torch.zeros_like(ratio, dtype=torch.bool)
    lo = None if p.clip_eps_low is None else 1.0 - p.clip_eps_low
    hi = None if p.clip_eps_high is None else 1.0 + p.clip_eps_high
    clipped = -ratio.clamp(min=lo, max=hi) * adv
    # where, not maximum: maximum splits the gradient in half at ties
    is_clipped = clipped > unclipped
    return torch.where(is_clipped, clipped, unclipped), is_clipped


def _tis_weight(old: Tensor, behaviour: Optional[Tensor], m: Tensor, cap: Optional[float]) -> Tensor:
    """min(exp(old_t - b_t), cap), detached, 0 at padding; 1 when cap is None."""
    if cap is None:
        return m.to(old.dtype)
    if behaviour is None:
        raise ValueError("loss.tis_cap is set but the batch has no behaviour_logp; pass the rollout's "
                         "behaviour_logp or set loss.tis_cap: null")
    return torch.where(m, (old - behaviour).exp().clamp(max=cap), 0.0)


def kl_k1_k3(logp: Tensor, teacher_logp: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token estimates of KL(p || teacher) on tokens sampled from p: with r = T - logp,
    k1 = -r (unbiased) and k3 = exp(r) - r - 1 (>= 0, lower variance). Elementwise, any shape."""
    r = teacher_logp - logp
    return -r, torch.expm1(r) - r


def _metrics(loss: Tensor, m: Tensor, old: Tensor, teacher: Tensor, teacher_logps: Optional[dict[str, Tensor]],
             ratio: Tensor, clipped: Tensor, tis: Tensor, extra: dict[str, Tensor]) -> dict[str, float]:
    """One device sync for all metrics: token means over valid tokens, plus counts."""
    with torch.no_grad():
        denom = m.sum().clamp(min=1)
        mean = lambda x: torch.where(m, x, 0.0).sum() / denom  # noqa: E731

        def k1_k3(t: Tensor, mt: Tensor) -> tuple[Tensor, Tensor]:
            """Token means over mt of kl_k1_k3(old, t) (t = old off mt, so no NaN gets in)."""
            k1, k3 = kl_k1_k3(old, torch.where(mt, t, old))
            d = mt.sum().clamp(min=1)
            return torch.where(mt, k1, 0.0).sum() / d, torch.where(mt, k3, 0.0).sum() / d

        vals = {"loss": loss.detach(), **extra}
        vals["kl_k1"], vals["kl_k3"] = k1_k3(teacher, m)
        for name, t in sorted((teacher_logps or {}).items()):
            if t.shape != m.shape:
                raise ValueError(f"teacher_logp.{name} has shape {tuple(t.shape)} but mask has {tuple(m.shape)}")
            # over the tokens this teacher scored (NaN: a routed sample of another teacher)
            vals[f"kl_k1/{name}"], vals[f"kl_k3/{name}"] = k1_k3(t.detach(), m & ~torch.isnan(t))
        vals.update(ratio_mean=mean(ratio), clip_frac=mean(clipped.to(ratio.dtype)), tis_weight_mean=mean(tis),
                    ratio_max=torch.where(m, ratio, 0.0).max() if m.numel() else ratio.new_zeros(()),
                    tokens=m.sum(), sequences=torch.tensor(m.shape[0], device=m.device))
        floats = torch.stack([v.detach().double().reshape(()) for v in vals.values()]).tolist()  # one sync
    return dict(zip(vals, floats))


def _old(s: Tensor, old: Optional[Tensor]) -> Tensor:
    return s.detach() if old is None else old.detach()


# ---- the losses ---------------------------------------------------------------------------------

def _distill(p: LossParams, s: Tensor, old: Tensor, b: Optional[Tensor], T: Tensor, r: Tensor, m: Tensor,
             normalizer: Optional[float], teacher_logps: Optional[dict[str, Tensor]],
             extra: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Policy gradient on the per-token reward r [B, R] (detached): discount, clip, TIS, aggregate."""
    ratio = torch.exp(s - old)
    per_token, clipped = _surrogate(ratio, discounted_returns(r, m, p.discount), p)
    tis = _tis_weight(old, b, m, p.tis_cap)
    loss = _aggregate(torch.where(m, per_token * tis, 0.0), m, p.aggregation, normalizer)
    extra = {"reward_mean": torch.where(m, r, 0.0).sum() / m.sum().clamp(min=1), **extra}
    return loss, _metrics(loss, m, old, T, teacher_logps, ratio, clipped, tis, extra)


def rkl_loss(logp: Tensor, teacher_logp: Tensor, mask: Tensor, *, old_logp: Optional[Tensor] = None,
             behaviour_logp: Optional[Tensor] = None, params: Optional[LossParams] = None,
             normalizer: Optional[float] = None,
             teacher_logps: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, dict[str, float]]:
    """On-policy reverse-KL distillation: reward r_t = T_t - sg(s_t), loss -rho_t r_t (clipped, TIS-weighted).

    logp (s_t, with grad), teacher_logp (T_t, combined), old_logp (old_t; default sg(s_t): rho = 1),
    behaviour_logp (b_t; needed when params.tis_cap is set), teacher_logps (per teacher, metrics
    only): [B, R] float. mask: [B, R] bool (nonzero = valid). Uses params' discount, clip_eps_*,
    tis_cap, aggregation. Returns (scalar loss to minimize, metrics).
    """
    p = params or LossParams(kind="rkl")
    m, x = _inputs(mask, logp=logp, teacher_logp=teacher_logp, old_logp=old_logp, behaviour_logp=behaviour_logp)
    s, T = x["logp"], x["teacher_logp"]
    r = T - s.detach()
    return _distill(p, s, _old(s, x["old_logp"]), x["behaviour_logp"], T, r, m, normalizer, teacher_logps, {})


def gopd_loss(logp: Tensor, teacher_logp: Tensor, mask: Tensor, *, ref_logp: Optional[Tensor] = None,
              old_logp: Optional[Tensor] = None, behaviour_logp: Optional[Tensor] = None,
              params: Optional[LossParams] = None, normalizer: Optional[float] = None,
              teacher_logps: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, dict[str, float]]:
    """G-OPD / ExOPD: reward r_t = lam (T_t - R_t) - (sg(s_t) - R_t), otherwise as rkl_loss.

    ref_logp (R_t): [B, R] float, required unless params.lam == 1 (then R_t cancels). Other
    tensors as in rkl_loss. The reward is computed as (T - sg(s)) + (lam - 1)(T - R), the same
    number, so that lam = 1 gives rkl's reward bit for bit.
    """
    p = params or LossParams(kind="gopd")
    if ref_logp is None and p.lam != 1.0:
        raise ValueError(f"gopd with lambda = {p.lam} needs ref_logp (R_t, the scored shard's ref_logp column); "
                         f"score with a reference model or use lambda = 1")
    m, x = _inputs(mask, logp=logp, teacher_logp=teacher_logp, ref_logp=ref_logp, old_logp=old_logp,
                   behaviour_logp=behaviour_logp)
    s, T, R = x["logp"], x["teacher_logp"], x["ref_logp"]
    r = T - s.detach()
    extra = {}
    if R is not None:
        r = r + (p.lam - 1.0) * (T - R)
        extra["ref_kl_k1"] = torch.where(m, _old(s, x["old_logp"]) - R, 0.0).sum() / m.sum().clamp(min=1)
    return _distill(p, s, _old(s, x["old_logp"]), x["behaviour_logp"], T, r, m, normalizer, teacher_logps, extra)


def kdrl_loss(logp: Tensor, teacher_logp: Tensor, mask: Tensor, *, advantages: Optional[Tensor] = None,
              rewards: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
              behaviour_logp: Optional[Tensor] = None, params: Optional[LossParams] = None,
              normalizer: Optional[float] = None,
              teacher_logps: Optional[dict[str, Tensor]] = None) -> tuple[Tensor, dict[str, float]]:
    """GRPO + KD: w_rl * L_grpo + w_kd * L_kl, or with kd_estimator="reward" one clipped surrogate
    on A_t = w_rl A_i + w_kd (T_t - old_t).

    advantages: [B] GRPO A_i from group_advantages over the whole iteration (needed when w_rl > 0
    or estimator is "reward" with w_rl > 0); rewards: [B] verifier rewards (kd_only_incorrect:
    KD only where reward < 1; metrics). Per-token tensors as in rkl_loss. L_kl per token:
    k2 = 0.5 (s - T)^2, k3 = exp(T - s) - (T - s) - 1, pg = rkl's clipped -rho r_t. The TIS
    weight multiplies each token's whole loss; both terms share one aggregation and normalizer
    (so kd_only_incorrect zeroes masked responses, it does not renormalize over the rest).
    w_rl = 0 is pure KD: w_kd * L_kl exactly, and advantages may be None.
    """
    p = params or LossParams(kind="kdrl")
    m, x = _inputs(mask, logp=logp, teacher_logp=teacher_logp, old_logp=old_logp, behaviour_logp=behaviour_logp)
    s, T = x["logp"], x["teacher_logp"]
    old, B = _old(s, x["old_logp"]), m.shape[0]
    A = _per_seq("advantages", advantages, B)
    rewards = _per_seq("rewards", rewards, B)
    if A is None and p.w_rl > 0:
        raise ValueError("kdrl with w_rl > 0 needs advantages [B] (group_advantages over the iteration's groups)")
    if rewards is None and p.kd_only_incorrect:
        raise ValueError("loss.kd_only_incorrect needs the verifier rewards [B] of the batch")
    kd_m = m & (rewards < 1).unsqueeze(1) if p.kd_only_incorrect else m
    ratio = torch.exp(s - old)
    tis = _tis_weight(old, x["behaviour_logp"], m, p.tis_cap)
    agg = lambda t: _aggregate(torch.where(m, t * tis, 0.0), m, p.aggregation, normalizer)  # noqa: E731
    extra: dict[str, Tensor] = {}
    clipped = torch.zeros_like(m)
    if p.kd_estimator == "reward":
        adv = p.w_kd * torch.where(kd_m, T - old, 0.0)
        if p.w_rl > 0:
            adv = adv + p.w_rl * A.to(s.dtype).unsqueeze(1)
        per_token, clipped = _surrogate(ratio, adv, p)
    else:
        per_token = torch.zeros_like(s)
        if p.w_rl > 0:
            rl_t, clipped = _surrogate(ratio, A.to(s.dtype).unsqueeze(1).expand_as(s), p)
            per_token = p.w_rl * rl_t
            extra["loss_rl"] = agg(rl_t).detach()
        if p.kd_estimator == "k2":
            kd_t = 0.5 * (s - T) ** 2
        elif p.kd_estimator == "k3":
            kd_t = torch.exp(T - s) - (T - s) - 1
        else:
            kd_t, kd_clipped = _surrogate(ratio, discounted_returns(T - s.detach(), m, p.discount), p)
            clipped = clipped if p.w_rl > 0 else kd_clipped
        kd_t = torch.where(kd_m, kd_t, 0.0)
        per_token = per_token + p.w_kd * kd_t
        extra["loss_kd"] = agg(kd_t).detach()
    loss = agg(per_token)
    if rewards is not None:
        extra["reward_mean"] = rewards.detach().double().mean() if B else rewards.new_zeros((), dtype=torch.float64)
    return loss, _metrics(loss, m, old, T, teacher_logps, ratio, clipped, tis, extra)


def sft_loss(logp: Tensor, mask: Tensor, *, teacher_logp: Optional[Tensor] = None,
             params: Optional[LossParams] = None,
             normalizer: Optional[float] = None) -> tuple[Tensor, dict[str, float]]:
    """Supervised fine-tuning on fixed responses: per-token loss -s_t (the negative log-likelihood),
    aggregated like every other loss (params.aggregation, normalizer); off-policy, so no ratio,
    clip or TIS.

    logp (s_t, with grad): [B, R] float; mask: [B, R] bool; teacher_logp (T_t, metrics only):
    [B, R] or None. Metrics: loss (this call's share), nll (token mean of -s_t), teacher_nll (token
    mean of -T_t: how likely the teachers find the data), tokens, sequences.
    """
    p = params or LossParams(kind="sft")
    m, x = _inputs(mask, logp=logp, teacher_logp=teacher_logp)
    s = x["logp"]
    loss = _aggregate(torch.where(m, -s, 0.0), m, p.aggregation, normalizer)
    with torch.no_grad():
        denom = m.sum().clamp(min=1)
        vals = {"loss": loss.detach(), "nll": -s.detach().sum() / denom}
        if x["teacher_logp"] is not None:
            vals["teacher_nll"] = -x["teacher_logp"].detach().sum() / denom
        vals.update(tokens=m.sum(), sequences=torch.tensor(m.shape[0], device=m.device))
        floats = torch.stack([v.double().reshape(()) for v in vals.values()]).tolist()  # one sync
    return loss, dict(zip(vals, floats))


def compute_loss(params: LossParams, batch: dict[str, Tensor],
                 normalizer: Optional[float] = None) -> tuple[Tensor, dict[str, float]]:
    """The trainer's one call: dispatch on params.kind.

    batch keys: logp, teacher_logp, mask (required; sft: logp, mask); old_logp, behaviour_logp, ref_logp (gopd),
    advantages and rewards (kdrl), and teacher_logp.NAME per teacher (metrics); topk: per teacher
    teacher_topk_logp.NAME, topk_logp.NAME [B, R, K] and topk_weight.NAME [B]; others are ignored.
    normalizer: global valid tokens (token_mean) or sequences (seq_mean) of the mini-batch.
    """
    required = ("logp", "mask") if params.kind == "sft" else ("logp", "teacher_logp", "mask")
    missing = [k for k in required if k not in batch]
    if missing:
        raise ValueError(f"compute_loss: batch lacks {missing} (has {sorted(batch)})")
    if params.kind == "topk":
        from opd_tasks.losses_topk import topk_loss  # noqa: PLC0415 - it builds on this module
        return topk_loss(params, batch, normalizer)
    if params.kind == "sft":
        return sft_loss(batch["logp"], batch["mask"], teacher_logp=batch.get("teacher_logp"), params=params,
                        normalizer=normalizer)
    teachers = {k.split(".", 1)[1]: v for k, v in batch.items() if k.startswith("teacher_logp.")}
    common = dict(old_logp=batch.get("old_logp"), behaviour_logp=batch.get("behaviour_logp"), params=params,
                  normalizer=normalizer, teacher_logps=teachers or None)
    args = (batch["logp"], batch["teacher_logp"], batch["mask"])
    if params.kind == "rkl":
        return rkl_loss(*args, **common)
    if params.kind == "gopd":
        return gopd_loss(*args, ref_logp=batch.get("ref_logp"), **common)
    return kdrl_loss(*args, advantages=batch.get("advantages"), rewards=batch.get("rewards"), **common)
