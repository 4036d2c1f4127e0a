"""Several teachers' per-token log-probs -> one teacher log-prob T_t (docs/algorithms.md, "Several teachers").

Everything works on FLAT arrays: all samples' response tokens concatenated, shape [N_tokens],
one array per teacher name (the scoring stage stores each teacher's own array as
`teacher_logp.NAME` next to the combination, so a run can be re-combined without re-scoring).
Math in float64, results float32.

    T = combine("mixture", {"math": a, "code": b}, weights={"math": 0.7, "code": 0.3})
    T = combine("route", teacher_flat, domain_to_teacher={"math": "math", "code": "code"},
                sample_domain=["math", "code"], offsets=[0, 5, 12])
    T = combine("product", teacher_flat, weights)

- mixture: T_t = logsumexp_k(log w_k + T_t^k), weights normalized to sum 1.
- route:   T_t = T_t^{teacher of the sample's domain}. A teacher's array is read only at its own
  domain's tokens: elsewhere it may be NaN (scoring.teachers: routed scores nothing there).
- product: T_t = sum_k w_k T_t^k, weights used as given (NOT normalized). The result is the log
  of an unnormalized product of experts: its normalizer over the vocabulary is unknown from
  per-token values, so T_t is not a log-prob (it may even be > 0 when sum w_k < 1).
A single teacher with weight 1 returns that teacher's values exactly (bitwise), in every mode.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from opd_tasks.errors import OpdError

MODES = ("mixture", "route", "product")
# log-probs are <= 0; a little float32 slack, but logits passed by mistake get caught
_MAX_LOGP = 1e-3


class CombinationError(OpdError):
    """Teacher weights, routing or per-teacher arrays that cannot be combined."""


def normalize_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights w_k >= 0 scaled to sum 1. Rejects empty, negative, NaN, inf and all-zero weights,
    naming the teacher."""
    _check_weights(weights)
    total = math.fsum(float(w) for w in weights.values())
    return {name: float(w) / total for name, w in weights.items()}


def mixture(teacher_flat: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """log sum_k w_k p_k(y_t): teacher_flat[name]: [N] log-probs; weights: per teacher (normalized
    here). Teachers of weight 0 do not take part. Returns [N] float32."""
    w = normalize_weights(_select(teacher_flat, weights))
    _check_arrays(teacher_flat, list(w))
    active = [k for k, wk in w.items() if wk > 0]
    if len(active) == 1:  # log(1) + T = T: return it untouched, bitwise
        return np.array(teacher_flat[active[0]], dtype=np.float32, copy=True)
    stacked = np.stack([np.log(w[k]) + np.asarray(teacher_flat[k], np.float64) for k in active])  # [K, N]
    top = stacked.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)  # every teacher -inf: keep -inf, avoid inf - inf
    with np.errstate(divide="ignore"):  # log(0) = -inf where every teacher gives -inf
        out = safe + np.log(np.exp(stacked - safe).sum(axis=0))
    return out.astype(np.float32)


def product(teacher_flat: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """sum_k w_k T_t^k with the weights as given (not normalized; the result is unnormalized,
    see the module docstring). Teachers of weight 0 do not take part. Returns [N] float32."""
    w = _select(teacher_flat, weights)
    _check_weights(w)
    _check_arrays(teacher_flat, list(w))
    active = [k for k, wk in w.items() if wk > 0]
    if len(active) == 1 and w[active[0]] == 1.0:
        return np.array(teacher_flat[active[0]], dtype=np.float32, copy=True)
    out = sum(float(w[k]) * np.asarray(teacher_flat[k], np.float64) for k in active)
    return out.astype(np.float32)


def route(teacher_flat: Mapping[str, np.ndarray], domain_to_teacher: Mapping[str, str], *,
          token_domain: Sequence[str | None] | np.ndarray | None = None,
          sample_domain: Sequence[str | None] | np.ndarray | None = None,
          offsets: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Each token takes the log-prob of its domain's teacher, exactly.

    Give either token_domain [N] or sample_domain [S] with offsets [S+1] (sample s owns flat
    tokens offsets[s]:offsets[s+1]; offsets[0] = 0, offsets[-1] = N). domain_to_teacher maps a
    domain to a teacher name (TeacherConfig.domain -> TeacherConfig.name). Returns [N] float32.
    """
    unknown = sorted(set(domain_to_teacher.values()) - set(teacher_flat))
    if unknown:
        raise CombinationError(f"route: domain_to_teacher names teachers {unknown} that were not scored "
                               f"(scored teachers: {sorted(teacher_flat)}); fix teachers[].domain in the config")
    n = _check_arrays(teacher_flat, list(teacher_flat), nan_ok=True)  # NaN: checked where read, below
    if (token_domain is None) == (sample_domain is None):
        raise CombinationError("route: give exactly one of token_domain or sample_domain (+ offsets)")
    if sample_domain is not None:
        sample_domain = np.asarray(sample_domain, dtype=object)
        if offsets is None:
            raise CombinationError("route: sample_domain needs offsets [S+1] into the flat token arrays")
        offsets = np.asarray(offsets, dtype=np.int64)
        lens = np.diff(offsets)
        if (len(offsets) != len(sample_domain) + 1 or offsets[0] != 0 or offsets[-1] != n
                or (lens < 0).any()):
            raise CombinationError(f"route: offsets must be [S+1] = [{len(sample_domain) + 1}] non-decreasing "
                                   f"from 0 to the token count {n}; got length {len(offsets)}, "
                                   f"first {offsets[:1].tolist()}, last {offsets[-1:].tolist()}")
        check_domains(sample_domain, domain_to_teacher, "sample")
        token_domain = np.repeat(sample_domain, lens)
    else:
        token_domain = np.asarray(token_domain, dtype=object)
        if token_domain.shape != (n,):
            raise CombinationError(f"route: token_domain has shape {token_domain.shape}, expected ({n},) "
                                   f"like the teacher arrays")
        check_domains(token_domain, domain_to_teacher, "token")
    out = np.empty(n, dtype=np.float32)
    for domain, teacher in domain_to_teacher.items():
        sel = token_domain == domain
        out[sel] = np.asarray(teacher_flat[teacher], dtype=np.float32)[sel]
        if np.isnan(out[sel]).any():
            i = int(np.flatnonzero(sel & np.isnan(out))[0])
            raise CombinationError(f"teacher {teacher!r}: token {i} of its own domain {domain!r} has no log-prob "
                                   f"(NaN); re-score this teacher")
    return out


def combine(mode: str, teacher_flat: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None, *,
            domain_to_teacher: Mapping[str, str] | None = None,
            token_domain: Sequence[str | None] | np.ndarray | None = None,
            sample_domain: Sequence[str | None] | np.ndarray | None = None,
            offsets: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Dispatch to mixture / product (need weights) or route (needs domain_to_teacher and the
    domains). Returns [N] float32."""
    if mode in ("mixture", "product"):
        if weights is None:
            raise CombinationError(f"combination={mode} needs teacher weights (teachers[].weight)")
        return (mixture if mode == "mixture" else product)(teacher_flat, weights)
    if mode == "route":
        if domain_to_teacher is None:
            raise CombinationError("combination=route needs domain_to_teacher (teachers[].domain)")
        return route(teacher_flat, domain_to_teacher, token_domain=token_domain,
                     sample_domain=sample_domain, offsets=offsets)
    raise CombinationError(f"combination={mode!r} is not one of {MODES}")


def topk_row_weights(mode: str, weights: Mapping[str, float], domain_to_teacher: Mapping[str, str],
                     sample_domain: Sequence[str | None]) -> dict[str, np.ndarray]:
    """How much each teacher's top-k divergence counts in each row (loss.kind=topk), [S] float64 per
    teacher: route: 1 for the teacher of the row's domain, 0 for the others (the routed teacher's
    top-k); mixture: the normalized weights w_k in every row. For the forward KL the weighted sum
    sum_k w_k KL(p_k || q) has the gradient of KL(sum_k w_k p_k || q): the mixture, exactly (with K =
    vocabulary size; with top-k each term is on its own teacher's buckets). For the reverse KL it is
    KL(q || normalized prod_k p_k^w_k) up to a constant; for jsd the weighted sum of the per-teacher
    JSDs (docs/algorithms.md). product: refused, its normalizer needs every token's values."""
    if mode == "product":
        raise CombinationError("loss.kind=topk with combination=product: the product of experts' normalizer "
                               "needs every token's teacher values, top-k stores K; use combination: mixture with "
                               "loss.divergence: rkl (the reverse KL to the normalized product) or route")
    n = len(sample_domain)
    if mode == "mixture":
        return {k: np.full(n, w) for k, w in normalize_weights(weights).items()}
    if mode != "route":
        raise CombinationError(f"combination={mode!r} is not one of {MODES}")
    domains = np.asarray(sample_domain, dtype=object)
    check_domains(domains, domain_to_teacher)
    out = {k: np.zeros(n) for k in weights}
    for domain, teacher in domain_to_teacher.items():
        out[teacher][domains == domain] = 1.0
    return out


def _check_weights(weights: Mapping[str, float]) -> None:
    if not weights:
        raise CombinationError("teacher weights are empty; configure at least one teacher with a weight > 0")
    for name, w in weights.items():
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise CombinationError(f"teacher {name!r}: weight {w!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise CombinationError(f"teacher {name!r}: weight must be finite and >= 0, got {w}; "
                                   f"fix teachers[].weight")
    if all(float(w) == 0 for w in weights.values()):
        raise CombinationError(f"teacher weights are all zero ({sorted(weights)}); give at least one "
                               f"teacher a weight > 0")


def _select(teacher_flat: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict[str, float]:
    """The weights, checked to name exactly the scored teachers."""
    missing = sorted(set(teacher_flat) - set(weights))
    extra = sorted(set(weights) - set(teacher_flat))
    if missing or extra:
        raise CombinationError(f"teacher weights and scored teachers differ: no weight for {missing}, "
                               f"weight but no log-probs for {extra}; every teacher needs both")
    return dict(weights)


def _check_arrays(teacher_flat: Mapping[str, np.ndarray], names: list[str], nan_ok: bool = False) -> int:
    """All named arrays are 1-D, equally long, log-probs (no NaN unless nan_ok, no +inf or clearly
    positive values). Returns their common length N."""
    if not teacher_flat:
        raise CombinationError("no teacher log-probs to combine")
    n = None
    for name in names:
        a = np.asarray(teacher_flat[name])
        if a.ndim != 1:
            raise CombinationError(f"teacher {name!r}: log-probs must be flat [N_tokens], got shape {a.shape}")
        if n is None:
            n, first = len(a), name
        elif len(a) != n:
            raise CombinationError(f"teacher {name!r}: {len(a)} token log-probs but teacher {first!r} has {n}; "
                                   f"all teachers must score the same responses")
        bad = (np.zeros(a.shape, bool) if nan_ok else np.isnan(a)) | (a > _MAX_LOGP)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise CombinationError(f"teacher {name!r}: token {i} has log-prob {a[i]} (NaN or > 0: not a "
                                   f"log-prob); re-score this teacher")
    return n


def check_domains(domains: np.ndarray, domain_to_teacher: Mapping[str, str], what: str = "sample") -> None:
    """Every domain is served by a teacher (route), else an error naming the first sample without one."""
    known = set(domain_to_teacher)
    for d in dict.fromkeys(domains.tolist()):  # unique, in order of first appearance
        if d not in known:
            i = int(np.flatnonzero(domains == d)[0])
            label = "no domain" if d is None else f"domain {d!r}"
            raise CombinationError(f"route: {what} {i} has {label}, and no teacher serves it (teachers serve "
                                   f"{sorted(known)}); set teachers[].domain or fix the prompts' domain column")
