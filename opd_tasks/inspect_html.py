"""`opd inspect RUN --iteration N --html FILE`: one scored stage as a self-contained HTML page.

    write_html("runs/demo", "iter7.html", iteration=7)      # or offline=True for the offline phase
    data = view_data("runs/demo", iteration=7)              # the JSON the page embeds

The page (opd_tasks/inspect_page.py: inline CSS and JS, no network) shows each sample's response as
tokens colored by the teacher-student gap T - b (combined teacher, or one teacher's T^k - b; T alone
where a row has no behaviour log-probs), the per-token details on hover and click (b, T, every T^k,
ref_logp, top-k alternatives when the shard has teacher_topk_ids.NAME / teacher_topk_logp.NAME),
filters by domain and reward, samples sorted by disagreement (mean |b - T| per token, as in
`opd inspect`), and a header with the whole stage's summary: KL(student || teacher) per teacher on
its own domain, rewards, lengths, finish reasons (and, offline, what the filter kept and dropped).
Iterations with more than `max_samples` rows show the most disagreeing half of max_samples plus a
uniform draw (seed 0) from the rest; the page says how many it shows of how many.
"""
from __future__ import annotations

import html
import json
import logging
import math
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opd_tasks.inspect import _decoder, _f, _find_scored, analyze, kl_estimates
from opd_tasks.inspect_page import PAGE
from storage.fs import filesystem, write_text_atomic
from storage.layout import RunLayout
from storage.shards import PROVENANCE_KEY, flat_logp, read_stage, teacher_columns

log = logging.getLogger("opd.inspect")
MAX_SAMPLES = 200
TOPK_IDS, TOPK_LOGP = "teacher_topk_ids.", "teacher_topk_logp."
DIGITS = 6  # log-probs on the page: float32 values rounded to 1e-6


def _round(x):
    """Floats (nested in lists) rounded to DIGITS; NaN/inf -> None (JSON has neither)."""
    if isinstance(x, list):
        return [_round(v) for v in x]
    if isinstance(x, float):
        return round(x, DIGITS) if math.isfinite(x) else None
    return x


def _rows(sub: pa.Table, name: str) -> list:
    """Per row of `sub`, the list column's values (floats rounded; None for a null row). Flat float
    lists are rounded in numpy (most of the page's values)."""
    col = sub.column(name).combine_chunks()
    if not (pa.types.is_list(col.type) and pa.types.is_floating(col.type.value_type)):
        return _round(col.to_pylist())
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]].astype(np.float64)
    if not np.isfinite(values).all():
        return _round(col.to_pylist())
    values = np.round(values, DIGITS).tolist()
    offsets = offsets - offsets[0]
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    return [values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(col))]


def _topk(sub: pa.Table, name: str, lengths: list[int]) -> list | None:
    """teacher top-k of one teacher per selected row as [[ids], [logps]] per token, or None when the
    shard has no such columns. Per row either list<list<...>> (one list per token) or a flat list of
    len(response) * K values."""
    if TOPK_IDS + name not in sub.column_names or TOPK_LOGP + name not in sub.column_names:
        return None
    ids, lps = _rows(sub, TOPK_IDS + name), _rows(sub, TOPK_LOGP + name)
    out = []
    for i_row, l_row, n in zip(ids, lps, lengths):
        if i_row is None or l_row is None:
            out.append(None)
            continue
        if i_row and not isinstance(i_row[0], list):  # flat: K per token
            k = len(i_row) // max(n, 1)
            i_row = [i_row[j * k:(j + 1) * k] for j in range(n)]
            l_row = [l_row[j * k:(j + 1) * k] for j in range(n)]
        out.append([[a, b] for a, b in zip(i_row, l_row)])
    return out


def _choose(per_sample: np.ndarray, max_samples: int, seed: int = 0) -> np.ndarray:
    """Row indices shown: all rows, or the max_samples // 2 most disagreeing plus a uniform draw of
    the rest (seed), sorted by disagreement (descending, rows without it last, stable)."""
    n = per_sample.size
    key = np.nan_to_num(per_sample, nan=-1.0)
    order = np.argsort(-key, kind="stable")
    if n > max_samples:
        top = order[:max_samples // 2]
        rest = np.random.default_rng(seed).choice(order[max_samples // 2:], max_samples - top.size, replace=False)
        chosen = np.concatenate([top, rest])
        order = chosen[np.argsort(-key[chosen], kind="stable")]
    return order


def _domain_kl(table: pa.Table, prov: dict, teachers: list[str], b: np.ndarray, row_of: np.ndarray) -> dict:
    """Per teacher, k1/k3 KL(student || teacher) estimates over the tokens of its domain (all tokens
    when the teacher has no domain) - the number `opd run` logs per iteration."""
    domain_of = {t.get("name"): t.get("domain") for t in prov.get("teachers", []) if isinstance(t, dict)}
    domains = np.array(table.column("domain").to_pylist(), dtype=object)[row_of]
    out = {}
    for k in teachers:
        lens = pc.list_value_length(table.column("response_ids")).to_numpy().astype(np.int64)
        tk = flat_logp(table.column("teacher_logp." + k), lens).astype(np.float64)  # NaN: not scored (routed)
        d = domain_of.get(k)
        sel = domains == d if d is not None else np.ones(tk.size, bool)
        k1, k3 = kl_estimates(b[sel], tk[sel])
        out[k] = {"domain": d, "tokens": int(sel.sum()), "kl_k1": _f(k1), "kl_k3": _f(k3)}
    return out


def _filter_decisions(stage_dir: str, fs) -> dict | None:
    """sample_id -> the offline filter's reason, when stage_dir is offline/scored and the filter ran."""
    if not stage_dir.rstrip("/").endswith("offline/scored"):
        return None
    from opd_tasks.offline.filter import read_decisions
    from storage.manifest import read_manifest
    filter_dir = stage_dir.rstrip("/").rsplit("/", 1)[0] + "/filter"
    if read_manifest(fs, filter_dir) is None:
        return None
    d = read_decisions(fs, filter_dir)
    return dict(zip(d["sample_id"], d["reason"]))


def view_data(run_dir: str, iteration: int | None = None, offline: bool = False, max_samples: int = MAX_SAMPLES,
              storage_options: dict | None = None) -> dict:
    """Everything the page shows, JSON-able: {"summary": ..., "teachers": [...], "vocab": {id: text},
    "samples": [{"id", "domain", "reward", "finish", "prompt", "tokens", "b", "T", "t": {NAME: [...]},
    "ref", "topk": {NAME: [[ids], [logps]] per token}, "disagreement", "filter"}]}."""
    fs, stage_dir, it = _find_scored(run_dir, iteration, offline, storage_options)
    table = read_stage(fs, stage_dir)
    prov = json.loads((table.schema.metadata or {}).get(PROVENANCE_KEY, b"{}"))
    decode, note = _decoder(prov.get("tokenizer_path"))
    report = analyze(table, prov, top=0)
    teachers = teacher_columns(table.column_names)
    n = table.num_rows
    resp_len = pc.list_value_length(table.column("response_ids")).to_numpy().astype(np.int64)
    row_of = np.repeat(np.arange(n), resp_len)
    has_b = ~pc.is_null(table.column("behaviour_logp")).to_numpy(zero_copy_only=False)
    b = np.full(row_of.size, np.nan)
    b[np.repeat(has_b, resp_len)] = pc.list_flatten(table.column("behaviour_logp")).to_numpy().astype(np.float64)
    t = pc.list_flatten(table.column("teacher_logp")).to_numpy().astype(np.float64)
    absd = np.abs(b - t)
    ok = np.isfinite(absd)
    counts = np.bincount(row_of, weights=ok, minlength=n)
    sums = np.bincount(row_of, weights=np.where(ok, absd, 0.0), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_sample = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    rows = _choose(per_sample, max_samples)
    lengths = resp_len[rows].tolist()
    decisions = _filter_decisions(stage_dir, fs)
    sub = table.take(pa.array(rows, pa.int64()))
    col = {c: sub.column(c).to_pylist()
           for c in ("sample_id", "prompt_id", "domain", "finish_reason", "reward", "prompt_ids", "response_ids")}
    lists = {"b": _rows(sub, "behaviour_logp"), "T": _rows(sub, "teacher_logp"),
             "ref": _rows(sub, "ref_logp") if "ref_logp" in sub.column_names else [None] * rows.size}
    per_t = {k: _rows(sub, "teacher_logp." + k) for k in teachers}
    topk = {k: v for k in teachers if (v := _topk(sub, k, lengths)) is not None}
    ids = sorted({i for r in col["response_ids"] for i in r}
                 | {i for v in topk.values() for r in v if r for tok in r for i in tok[0]})
    vocab = {str(i): decode([i]) for i in ids}
    samples = []
    for j, r in enumerate(rows):
        samples.append({"id": col["sample_id"][j], "prompt_id": col["prompt_id"][j], "domain": col["domain"][j],
                        "reward": _f(col["reward"][j]), "finish": col["finish_reason"][j],
                        "prompt": decode(col["prompt_ids"][j]), "prompt_ids": col["prompt_ids"][j],
                        "tokens": col["response_ids"][j], "b": lists["b"][j], "T": lists["T"][j],
                        "t": {k: per_t[k][j] for k in teachers}, "ref": lists["ref"][j],
                        "topk": {k: v[j] for k, v in topk.items() if v[j] is not None},
                        "disagreement": _f(per_sample[r]),
                        "filter": decisions.get(col["sample_id"][j]) if decisions else None})
    summary = {"stage_dir": stage_dir, "iteration": it if it is not None else prov.get("iteration"),
               "offline": bool(offline), "tokenizer": note, "combination": prov.get("combination"),
               "samples": n, "shown": len(samples), "tokens": report["tokens"],
               "sampled": None if n <= max_samples else
               f"the {max_samples // 2} most disagreeing samples plus {len(samples) - max_samples // 2} drawn "
               f"uniformly (seed 0) from the other {n - max_samples // 2}",
               "teachers": report["teachers"], "combined": report["combined"], "reference": report.get("reference"),
               "teacher_kl_on_domain": _domain_kl(table, prov, teachers, b, row_of),
               "student": report["student"], "rewards": report["rewards"], "lengths": report["lengths"],
               "domains": report["domains"],
               "filter": _filter_summary(decisions)}
    return {"summary": summary, "teachers": teachers, "has_ref": "ref_logp" in table.column_names,
            "has_topk": sorted(topk), "vocab": vocab, "samples": samples}


def _filter_summary(decisions: dict | None) -> dict | None:
    if not decisions:
        return None
    out: dict[str, int] = {}
    for why in decisions.values():
        out[why] = out.get(why, 0) + 1
    return out


def render_html(data: dict) -> str:
    """The page: the template with the data embedded as JSON ('<' escaped, so no string in the data
    can close the script element)."""
    blob = json.dumps(data, allow_nan=False, separators=(",", ":")).replace("<", "\\u003c")
    s = data["summary"]
    title = f"opd inspect: {s['stage_dir']}" + (f" iteration {s['iteration']}" if s["iteration"] is not None else "")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", blob)


def write_html(run_dir: str, out: str, iteration: int | None = None, offline: bool = False,
               max_samples: int = MAX_SAMPLES, storage_options: dict | None = None) -> dict:
    """Write the page of one scored stage to `out` (any fsspec URL), atomically. Returns the summary."""
    data = view_data(run_dir, iteration=iteration, offline=offline, max_samples=max_samples,
                     storage_options=storage_options)
    fs, path = filesystem(out, storage_options)
    write_text_atomic(fs, path, render_html(data))
    return {**data["summary"], "html": out}


def write_iteration_view(layout: RunLayout, iteration: int) -> str | None:
    """RUN/iter-N/inspect.html for `opd run` (linked from the iteration's Prefect artifact): its URL,
    or None with a warning when the page cannot be made (a view never fails a finished iteration)."""
    path = layout.inspect_html(iteration)
    try:
        data = view_data(layout.url, iteration=iteration, storage_options=layout.storage_options)
        write_text_atomic(layout.fs, path, render_html(data))
    except Exception as err:  # noqa: BLE001 - the iteration's stages are done; the page is a by-product
        log.warning("iteration %d: no HTML view (%s: %s); `opd inspect %s --iteration %d --html FILE` retries",
                    iteration, type(err).__name__, err, layout.url, iteration)
        return None
    return layout.url_of(path)
