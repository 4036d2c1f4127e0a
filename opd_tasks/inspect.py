"""`opd inspect`: where did teachers and student disagree in a scored stage?

    inspect_report("runs/demo", iteration=3)       # per teacher: mean log-prob, KL estimates, mixture share
    inspect_report("runs/demo", sample="3-p7-1")   # ... plus that sample token by token
    inspect_report("runs/demo", offline=True)      # the offline data, + what the filter kept and dropped, and why

Per response token t of a sample (docs/algorithms.md notation): b = behaviour_logp (the student that
sampled), T^k = teacher_logp.NAME, T = teacher_logp (combined). With d = b - T^k:
  k1 = d, k3 = exp(-d) + d - 1 (>= 0); their means over tokens estimate KL(student || teacher) per
  token (k1 unbiased, k3 lower variance). Mixture share of teacher k = mean over tokens of
  w_k p_k / sum_j w_j p_j (weights from provenance): how much of the mixture teacher k carries.
Disagreement of a token = |b - T|; a sample's is the mean over its tokens. Rows without
behaviour_logp (offline data) count for teacher means but not for KL or disagreement.
Rendering: opd_tasks/render.py; `opd status`: opd_tasks/status.py; the offline filter's part:
opd_tasks/offline/view.py.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.errors import OpdError
from storage.fs import exists, filesystem
from storage.layout import RunLayout
from storage.manifest import MANIFEST_NAME, read_manifest, stage_status
from storage.shards import PROVENANCE_KEY, TEACHER_PREFIX, flat_logp, read_stage, teacher_columns

CONTEXT_TOKENS = 8


def _f(x: Any, nd: int = 6) -> float | None:
    """JSON-safe float (None for NaN/inf/missing)."""
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


# ---- inspect: finding the stage ----------------------------------------------------------------------

def _find_scored(run_dir: str, iteration: int | None, offline: bool, storage_options: dict | None):
    """(fs, stage_dir, iteration or None) of the scored stage to inspect."""
    fs, root = filesystem(run_dir, storage_options)
    if exists(fs, f"{root}/{MANIFEST_NAME}"):
        return fs, root, None  # a stage directory itself (e.g. the output of `opd score`)
    layout = RunLayout(run_dir, storage_options)
    if offline:
        return fs, layout.offline_dir("scored"), None
    if not layout.iterations() and exists(fs, layout.join("scored", MANIFEST_NAME)):
        return fs, layout.join("scored"), None
    if iteration is None:
        done = [n for n in layout.iterations() if stage_status(fs, layout.stage_dir(n, "scored")) == "done"]
        if not done:
            raise OpdError(f"{run_dir}: no iteration has a finished scored stage yet (see `opd status {run_dir}`)")
        iteration = done[-1]
    return fs, layout.stage_dir(iteration, "scored"), iteration


# ---- inspect: the numbers (pure functions of a scored table) -----------------------------------------

def _flat(table: pa.Table, name: str, token_valid: np.ndarray | None = None) -> np.ndarray:
    """A log-prob list column as float64 [N_tokens]; null rows (with token_valid) become NaN."""
    vals = pc.list_flatten(table.column(name)).to_numpy().astype(np.float64)
    if token_valid is None or token_valid.all():
        return vals
    out = np.full(token_valid.shape, np.nan)
    out[token_valid] = vals
    return out


def kl_estimates(b: np.ndarray, t: np.ndarray) -> tuple[float, float]:
    """Token means of k1 = b - t and k3 = exp(t - b) - (t - b) - 1 (losses.kl_k1_k3) over finite
    entries. b, t: [N] float64."""
    import torch

    from opd_tasks.losses import kl_k1_k3
    ok = np.isfinite(b) & np.isfinite(t)
    if not ok.any():
        return math.nan, math.nan
    k1, k3 = kl_k1_k3(torch.from_numpy(np.ascontiguousarray(b[ok], np.float64)),
                      torch.from_numpy(np.ascontiguousarray(t[ok], np.float64)))
    return float(k1.mean()), float(k3.mean())


def mixture_share(teacher_logp: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, float]:
    """Per teacher, the token mean of the posterior w_k p_k / sum_j w_j p_j (weights normalized)."""
    names = list(teacher_logp)
    w = np.array([max(float(weights.get(k, 1.0)), 0.0) for k in names])
    w = w / w.sum() if w.sum() > 0 else np.full(len(names), 1.0 / len(names))
    with np.errstate(divide="ignore"):
        logits = np.stack([teacher_logp[k] for k in names]) + np.log(w)[:, None]  # [K, N]
    if logits.shape[1] == 0:
        return {k: math.nan for k in names}
    m = logits.max(0)
    post = np.exp(logits - m)
    post /= post.sum(0)
    return {k: float(post[i].mean()) for i, k in enumerate(names)}


def _stats(x: np.ndarray) -> dict:
    x = x[np.isfinite(x)] if x.dtype.kind == "f" else x
    if x.size == 0:
        return {"count": 0, "mean": None, "std": None, "min": None, "max": None}
    lo, hi = (int(x.min()), int(x.max())) if x.dtype.kind in "iu" else (_f(x.min()), _f(x.max()))
    return {"count": int(x.size), "mean": _f(x.mean()), "std": _f(x.std()), "min": lo, "max": hi}


def analyze(table: pa.Table, provenance: dict, top: int = 5, sample: str | None = None,
            decode: Callable[[list[int]], str | None] = lambda ids: None) -> dict:
    """The inspect report of a scored table (see the module docstring); JSON-able."""
    teachers = teacher_columns(table.column_names)
    if not teachers or "teacher_logp" not in table.column_names:
        raise OpdError("inspect needs a scored stage (teacher_logp columns); this stage has "
                       f"{table.column_names}")
    n = table.num_rows
    resp_len = pc.list_value_length(table.column("response_ids")).to_numpy().astype(np.int64)
    prompt_len = pc.list_value_length(table.column("prompt_ids")).to_numpy().astype(np.int64)
    row_of = np.repeat(np.arange(n), resp_len)                         # [N_tokens]
    pos_of = np.arange(row_of.size) - np.repeat(np.cumsum(resp_len) - resp_len, resp_len)
    has_b = ~pc.is_null(table.column("behaviour_logp")).to_numpy(zero_copy_only=False)
    b = _flat(table, "behaviour_logp", np.repeat(has_b, resp_len))
    t = _flat(table, "teacher_logp")
    # NaN where a teacher did not score the sample (scoring.teachers: routed)
    tk = {k: flat_logp(table.column(TEACHER_PREFIX + k), resp_len).astype(np.float64) for k in teachers}
    weights = {x["name"]: x.get("weight", 1.0) for x in provenance.get("teachers", []) if isinstance(x, dict)}
    routed = any(table.column(TEACHER_PREFIX + k).null_count for k in teachers)
    share = {k: None for k in teachers} if routed else mixture_share(tk, weights)
    per_teacher = []
    for k in teachers:
        k1, k3 = kl_estimates(b, tk[k])
        scored = np.isfinite(tk[k])
        per_teacher.append({"teacher": k, "weight": weights.get(k),
                            "mean_logp": _f(tk[k][scored].mean() if scored.any() else None),
                            "kl_k1": _f(k1), "kl_k3": _f(k3), "mixture_share": _f(share[k]),
                            "scored_tokens": int(scored.sum())})
    k1, k3 = kl_estimates(b, t)
    combined = {"teacher": "combined", "mode": provenance.get("combination"), "mean_logp": _f(np.mean(t) if t.size else None),
                "kl_k1": _f(k1), "kl_k3": _f(k3)}
    extra = {}
    if "ref_logp" in table.column_names:
        r = _flat(table, "ref_logp")
        extra["reference"] = {"mean_logp": _f(r.mean() if r.size else None), "kl_k1": _f(kl_estimates(b, r)[0]),
                              "kl_k3": _f(kl_estimates(b, r)[1])}
    diff = b - t                                                        # [N_tokens], NaN without b
    absd = np.abs(diff)
    sums = np.bincount(row_of, weights=np.nan_to_num(absd), minlength=n)
    counts = np.bincount(row_of, weights=np.isfinite(absd), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    col = {c: table.column(c).to_pylist() for c in ("sample_id", "prompt_id", "domain", "finish_reason", "reward")}
    resp_ids = table.column("response_ids")
    report = {
        "samples": n, "tokens": int(resp_len.sum()),
        "student": {"mean_behaviour_logp": _f(np.nanmean(b) if np.isfinite(b).any() else None)},
        "teachers": per_teacher, "combined": combined, **extra,
        "rewards": {**_stats(pc.drop_null(table.column("reward")).to_numpy().astype(np.float64)),
                    "missing": int(table.column("reward").null_count)},
        "lengths": {"prompt": _stats(prompt_len), "response": _stats(resp_len),
                    "finish_reason": dict(Counter(col["finish_reason"]))},
        "domains": _per_domain(col["domain"], col["reward"], resp_len, sums, counts),
        "top_samples": [], "top_tokens": [],
    }
    order = np.argsort(-np.nan_to_num(per_sample, nan=-1.0), kind="stable")[:top]
    for i in order:
        if not np.isfinite(per_sample[i]):
            break
        ids = resp_ids[int(i)].as_py()
        report["top_samples"].append({"sample_id": col["sample_id"][i], "prompt_id": col["prompt_id"][i],
                                      "domain": col["domain"][i], "reward": _f(col["reward"][i]),
                                      "response_len": int(resp_len[i]), "mean_abs_diff": _f(per_sample[i]),
                                      "response": decode(ids), "response_ids": ids})
    tok_order = np.argsort(-np.nan_to_num(absd, nan=-1.0), kind="stable")[:top]
    for j in tok_order:
        if not np.isfinite(absd[j]):
            break
        i, p = int(row_of[j]), int(pos_of[j])
        ids = resp_ids[i].as_py()
        report["top_tokens"].append({"sample_id": col["sample_id"][i], "position": p, "token_id": ids[p],
                                     "token": decode([ids[p]]), "context": decode(ids[max(0, p - CONTEXT_TOKENS):p]),
                                     "behaviour_logp": _f(b[j]), "teacher_logp": _f(t[j]),
                                     "teachers": {k: _f(tk[k][j]) for k in teachers}, "diff": _f(diff[j])})
    if sample is not None:
        report["sample"] = _sample_view(table, sample, col, b, t, tk, row_of, decode)
        if provenance.get("top_k"):  # each token's top-k alternatives per teacher
            from opd_tasks.inspect_topk import add_topk
            add_topk(report["sample"]["tokens"], table, col["sample_id"].index(sample), provenance["top_k"], decode)
    return report


def _per_domain(domains: list, rewards: list, resp_len: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> list:
    out = []
    for d in sorted({x for x in domains}, key=lambda x: (x is None, str(x))):
        idx = np.array([i for i, x in enumerate(domains) if x == d])
        r = np.array([rewards[i] for i in idx if rewards[i] is not None], dtype=np.float64)
        c = counts[idx].sum()
        out.append({"domain": d, "samples": int(idx.size), "tokens": int(resp_len[idx].sum()),
                    "mean_reward": _f(r.mean() if r.size else None),
                    "mean_abs_diff": _f(sums[idx].sum() / c if c else None)})
    return out


def _sample_view(table, sample, col, b, t, tk, row_of, decode) -> dict:
    try:
        i = col["sample_id"].index(sample)
    except ValueError:
        raise OpdError(f"sample_id {sample!r} is not in this stage; e.g. {col['sample_id'][:3]} "
                       f"(the top_samples list shows more)") from None
    ids = table.column("response_ids")[i].as_py()
    prompt = table.column("prompt_ids")[i].as_py()
    js = np.flatnonzero(row_of == i)
    ref = _flat(table, "ref_logp")[js] if "ref_logp" in table.column_names else None
    tokens = []
    for p, j in enumerate(js):
        tokens.append({"position": p, "token_id": ids[p], "token": decode([ids[p]]), "behaviour_logp": _f(b[j]),
                       "teacher_logp": _f(t[j]), "teachers": {k: _f(v[j]) for k, v in tk.items()},
                       **({"ref_logp": _f(ref[p])} if ref is not None else {}), "diff": _f(b[j] - t[j])})
    return {"sample_id": sample, "prompt_id": col["prompt_id"][i], "domain": col["domain"][i],
            "reward": _f(col["reward"][i]), "finish_reason": col["finish_reason"][i], "prompt_ids": prompt,
            "prompt": decode(prompt), "response": decode(ids), "tokens": tokens}


def _decoder(tokenizer_path: str | None) -> tuple[Callable[[list[int]], str | None], str]:
    """(decode ids -> text or None, note). Falls back to None (ids shown) when unavailable."""
    if not tokenizer_path:
        return (lambda ids: None), "no tokenizer_path in the shard provenance: showing token ids"
    try:
        from opd_tasks.models import load_tokenizer

        tok = load_tokenizer(tokenizer_path)
    except Exception as err:  # noqa: BLE001 - any failure to load means: show ids
        return (lambda ids: None), f"tokenizer {tokenizer_path!r} unavailable ({type(err).__name__}): showing ids"
    return (lambda ids: tok.decode(ids, skip_special_tokens=False)), f"decoded with {tokenizer_path}"


def inspect_report(run_dir: str, iteration: int | None = None, sample: str | None = None, top: int = 5,
                   offline: bool = False, storage_options: dict | None = None) -> dict:
    """Where teachers and student disagreed in one scored stage (default: the latest done one).
    run_dir may also be a scored stage directory itself (holding _MANIFEST.json)."""
    fs, stage_dir, it = _find_scored(run_dir, iteration, offline, storage_options)
    table = read_stage(fs, stage_dir)
    prov = json.loads((table.schema.metadata or {}).get(PROVENANCE_KEY, b"{}"))
    decode, note = _decoder(prov.get("tokenizer_path"))
    manifest = read_manifest(fs, stage_dir)
    report = {"stage_dir": stage_dir, "iteration": it if it is not None else prov.get("iteration"),
              "tokenizer": note, "provenance": prov, "stage_extra": manifest.extra if manifest else {}}
    report.update(analyze(table, prov, top=top, sample=sample, decode=decode))
    if offline and it is None and stage_dir.rstrip("/").endswith("offline/scored"):
        from opd_tasks.offline.view import filter_report
        report["filter"] = filter_report(fs, stage_dir.rstrip("/").rsplit("/", 1)[0] + "/filter", table, top, decode)
    return report
